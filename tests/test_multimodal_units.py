"""Vision projector, chat template, thinking/sampling and architecture checks: plain units (no server)."""

from __future__ import annotations

import struct
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.config import load_matrix
from pytest_llamabench.errors import ConfigError, ModelLoadError, UnsupportedArchitecture
from pytest_llamabench.measure.chat_options import TokenSplit
from pytest_llamabench.measure.vision import png
from pytest_llamabench.model.files import embedded_model_path, verify_model
from pytest_llamabench.model.projector import verify_projector
from pytest_llamabench.model.synth.projector import PROJECTOR_SHAPES, write_synthetic_projector
from pytest_llamabench.model.synth.writer import gguf_file
from pytest_llamabench.model.template import can_think, chat_template_args
from pytest_llamabench.server.arch import build_knows_architecture, check_architecture
from pytest_llamabench.server.container import _mount_file_args

REPO = Path(__file__).resolve().parent.parent
TINY = PROJECTOR_SHAPES["tiny"]


@pytest.fixture(scope="module")
def text_model() -> Path:
    return embedded_model_path("smollm2-135m-instruct-q4_1")


@pytest.fixture(scope="module")
def vlm_text_model() -> Path:
    """SmolLM2-135M with SmolVLM's image tokens (derived into the cache on first use)."""
    return embedded_model_path("smollm2-135m-instruct-q4_1-vlm-tokens")


@pytest.fixture(scope="module")
def projector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_projector(TINY, tmp_path_factory.mktemp("mmproj") / "mmproj-tiny.gguf")


# -- the vision projector ---------------------------------------------------------------


def test_a_synthetic_projector_verifies_against_its_text_model(projector: Path, vlm_text_model: Path) -> None:
    text = verify_model(vlm_text_model, hash_file=False)
    assert text.n_embd == 576 and text.metadata["llama.vocab_size"] == 49152 + 40
    info = verify_projector(projector, text_model=text, where="m.mmproj")
    assert (info.projector_type, info.projection_dim, info.image_size, info.n_layer) == ("idefics3", 576, 64, 2)
    assert info.tensor_count == 4 + 16 * TINY.n_layer + 2  # patch w+b, pos, fc; 16 per block; post_ln w+b


def test_the_real_smolvlm_shape_matches_smollm2(text_model: Path) -> None:
    shape = PROJECTOR_SHAPES["smolvlm-256m"]
    assert shape.projection_dim == verify_model(text_model, hash_file=False).n_embd == 576
    assert shape.tokens_per_tile == 64  # (512 / 16)^2 patches, pixel shuffle by 4x4


def test_a_smolvlm_projector_needs_smolvlm_image_tokens_in_the_text_model(projector: Path, text_model: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"idefics3 \(SmolVLM\) projector, but the text model .* has no "
                                             r"<fake_token_around_image>, <global-img> token.*vlm-tokens"):  # fmt: skip
        verify_projector(projector, text_model=verify_model(text_model, hash_file=False), where="m.mmproj")


def test_an_mmproj_of_another_model_is_refused(tmp_path: Path, text_model: Path) -> None:
    other = write_synthetic_projector(TINY, tmp_path / "mmproj-2048.gguf", projection_dim=2048)
    with pytest.raises(ModelLoadError, match=r"m\.mmproj: .*projects images to 2048-wide.*576 wide.*another model"):
        verify_projector(other, text_model=verify_model(text_model, hash_file=False), where="m.mmproj")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"not a readable GGUF|truncated"),  # the user's "1KB" file: the first KB of a real one
        (b"<!DOCTYPE html><html><body>Access denied</body></html>", r"not a GGUF file \(starts with b'<!DO'"),
    ],
)
def test_a_1kb_or_html_mmproj_is_a_bad_model(tmp_path: Path, projector: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "mmproj.gguf"
    path.write_bytes(content if content is not None else projector.read_bytes()[:1024])
    with pytest.raises(ModelLoadError, match=message):
        verify_projector(path, text_model=None, where="m.mmproj")


@pytest.mark.parametrize(
    ("projector_type", "message"),
    [("idefics3", r"holds 1 tensors in \d+ bytes: too small for a vision encoder"),
     (None, r"has no vision projector \(clip\.projector_type")],
)  # fmt: skip
def test_a_clip_file_without_an_encoder_is_refused(tmp_path: Path, projector_type: str | None, message: str) -> None:
    import numpy as np

    path = tmp_path / "mmproj-stub.gguf"
    with gguf_file(path, "clip") as writer:
        if projector_type:
            writer.add_string("clip.projector_type", projector_type)
        writer.add_bool("clip.has_vision_encoder", True)
        writer.add_tensor("mm.model.fc.weight", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ModelLoadError, match=message):
        verify_projector(path, text_model=None, where="m.mmproj")


def test_a_text_model_given_as_mmproj_is_refused(text_model: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"is a 'llama' model, not a vision projector"):
        verify_projector(text_model, text_model=None, where="m.mmproj")


def test_mmproj_paths_resolve_like_the_model(tmp_path: Path) -> None:
    matrix = tmp_path / "m.toml"
    matrix.write_text(textwrap.dedent("""
        [matrix]
        models_dir = "models"
        [models.a]
        file = "a.gguf"
        mmproj = "mmproj-a.gguf"
        [models.b]
        path = "b.gguf"
        mmproj = "synth:tiny"
        [defaults]
        ctx = 512
        [configs.c]
        model = "a"
    """))
    models = {m.name: m for m in (c.model for c in load_matrix([matrix]).configs.values())}
    assert models["a"].mmproj == str(tmp_path / "models" / "mmproj-a.gguf")


# -- PNG images -----------------------------------------------------------------------------


def test_generated_images_are_valid_pngs() -> None:
    data = png(32, seed=3)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, color) == (32, 32, 8, 2)
    length = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41 : 41 + length])
    assert len(raw) == 32 * (1 + 32 * 3)
    assert png(32, seed=4) != data  # a different image each repetition


# -- chat templates and thinking --------------------------------------------------------------


def test_chat_template_values_become_flags() -> None:
    assert chat_template_args("gguf") == []
    assert chat_template_args("chatml") == ["--chat-template", "chatml"]
    assert chat_template_args("file:/t/x.jinja") == ["--jinja", "--chat-template-file", "/t/x.jinja"]


def test_a_template_file_is_resolved_and_must_exist(tmp_path: Path, text_model: Path) -> None:
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    base = f'[models.m]\npath = "{text_model}"\n[defaults]\nmodel = "m"\nctx = 512\n'
    good = tmp_path / "good.toml"
    good.write_text(base + '[configs.c]\nchat_template = "file:t.jinja"\n')
    config = load_matrix([good]).configs["c"]
    assert config.server_args()[-3:] == ["--jinja", "--chat-template-file", str(tmp_path / "t.jinja")]
    bad = tmp_path / "bad.toml"
    bad.write_text(base + '[configs.c]\nchat_template = "file:missing.jinja"\n')
    with pytest.raises(ConfigError, match=r"configs\.c\.chat_template: chat template file not found"):
        load_matrix([bad])


def test_templates_that_can_think() -> None:
    qwen = (REPO / "configs/templates/qwen3.5.jinja").read_text()
    assert can_think(qwen) is True
    smol = verify_model(embedded_model_path("smollm2-135m-instruct-q4_1"), hash_file=False)
    assert can_think(smol.metadata["tokenizer.chat_template"]) is False
    assert can_think(None) is None


def test_workload_thinking_and_sampling_keys(tmp_path: Path, text_model: Path) -> None:
    base = f'[models.m]\npath = "{text_model}"\n[defaults]\nmodel = "m"\nctx = 512\n[configs.c]\n'
    good = tmp_path / "good.toml"
    good.write_text(base + '[workloads.t]\nkind = "chat"\nthinking = "on"\ntemperature = 0.6\ntop_k = 20\n'
                    'reasoning_budget = 16\nconfigs = ["c*"]\n')  # fmt: skip
    w = load_matrix([good]).workloads["t"]
    assert (w.thinking, dict(w.sampling), w.reasoning_budget, w.configs) == ("on", {"temperature": 0.6, "top_k": 20}, 16, ("c*",))
    for body, message in [
        ('[workloads.t]\nthinking = "on"\n', r"workloads\.t\.thinking: only chat workloads think"),
        ('[workloads.t]\nkind = "chat"\ntop_p = 2.0\n', r"workloads\.t\.top_p: 2\.0 is out of range"),
        ('[workloads.t]\nkind = "chat"\nthinking = "yes"\n', r"workloads\.t\.thinking"),
        ('[workloads.t]\nimages = 2\n', r"workloads\.t\.images: only vision workloads"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(base + body)
        with pytest.raises(ConfigError, match=message):
            load_matrix([bad])


def test_vision_and_configs_globs_decide_where_a_workload_runs(tmp_path: Path, text_model: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(textwrap.dedent(f"""
        [models.text]
        path = "{text_model}"
        [models.vlm]
        path = "{text_model}"
        mmproj = "synth:tiny"
        [defaults]
        ctx = 512
        [workloads.v]
        kind = "vision"
        [workloads.only-b]
        configs = ["b*"]
        [configs.a]
        model = "text"
        [configs.b1]
        model = "vlm"
    """))
    m = load_matrix([path])
    runs = {(c, w) for c in m.configs for w in m.workloads if m.workloads[w].applies_to(m.configs[c])}
    assert runs == {("b1", "v"), ("b1", "only-b")}


def test_reasoning_and_answer_deltas_are_counted_apart() -> None:
    split = TokenSplit()
    events: list[dict[str, Any]] = [{"choices": [{"delta": {"reasoning_content": "hm"}}]}, {"choices": [{"delta": {"reasoning_content": "ok"}}]},
              {"choices": [{"delta": {"content": "Paris"}}]}, {"choices": [{"delta": {}}]}]  # fmt: skip
    assert [split(e) for e in events] == [(1, ""), (1, ""), (1, "Paris"), (0, "")]
    assert (split.reasoning, split.answer) == (2, 1)


# -- architectures of a build -------------------------------------------------------------------


def test_an_architecture_missing_from_the_build_fails_fast(tmp_path: Path) -> None:
    binary = tmp_path / "bin" / "llama-server"
    binary.parent.mkdir()
    binary.write_bytes(b"\x7fELF...\x00llama\x00qwen3moe\x00qwen2\x00...")
    assert build_knows_architecture(binary, "qwen3moe") is True
    assert build_knows_architecture(binary, "qwen35moe") is False
    with pytest.raises(UnsupportedArchitecture, match=r"does not know architecture 'qwen35moe'.*build-server --sdist"):
        check_architecture(binary, "qwen35moe", model=Path("Qwen3.5-35B-A3B-Q4_K_M.gguf"), where="m.toml:models.q4")
    lib = tmp_path / "lib" / "libllama.so.0"  # a shared build: the names live in libllama
    lib.parent.mkdir()
    lib.write_bytes(b"\x00qwen35moe\x00")
    assert build_knows_architecture(binary, "qwen35moe") is True


def test_a_probe_that_finds_no_architecture_table_says_nothing(tmp_path: Path) -> None:
    script = tmp_path / "llama-server"
    script.write_text("#!/bin/sh\nexec /opt/llama/llama-server \"$@\"\n")
    assert build_knows_architecture(script, "qwen35moe") is None
    check_architecture(script, "qwen35moe", model=Path("m.gguf"), where="x")  # no error: cannot tell


# -- containers -----------------------------------------------------------------------------------


def test_host_files_in_args_are_mounted_into_a_container() -> None:
    args, volumes = _mount_file_args(["--ctx-size", "512", "--mmproj", "/data/mm/p.gguf", "--chat-template-file", "/t/c.jinja"])
    assert args == ["--ctx-size", "512", "--mmproj", "/files/0/p.gguf", "--chat-template-file", "/files/1/c.jinja"]
    assert volumes == {"/data/mm/p.gguf": {"bind": "/files/0/p.gguf", "mode": "ro"},  # the files only
                       "/t/c.jinja": {"bind": "/files/1/c.jinja", "mode": "ro"}}  # fmt: skip


def test_the_session_names_models_the_build_cannot_load_before_any_server(tmp_path: Path, text_model: Path) -> None:
    import numpy as np

    from pytest_llamabench.preflight import architecture_problems

    future = tmp_path / "future.gguf"
    with gguf_file(future, "qwen35moe") as writer:
        writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    matrix = tmp_path / "m.toml"
    matrix.write_text(f'[models.old]\npath = "{text_model}"\n[models.new]\npath = "{future}"\n[defaults]\nctx = 512\n'
                      '[configs.a]\nmodel = "old"\n[configs.b]\nmodel = "new"\n[configs.c]\nmodel = "new"\n')  # fmt: skip
    configs = list(load_matrix([matrix]).configs.values())
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"\x00llama\x00qwen3moe\x00")  # an old build: no qwen35moe
    problems = architecture_problems(configs, lambda: binary)
    assert [p.split(":")[0] for p in problems] == ["config b will fail", "config c will fail"]
    assert "does not know architecture 'qwen35moe'" in problems[0]
    assert architecture_problems(configs, lambda: None) == []  # no binary yet: the launches check


def test_a_synth_projector_projects_to_its_text_model(vlm_text_model: Path) -> None:
    import dataclasses

    from pytest_llamabench.model.projector import resolve_mmproj

    smol = verify_model(vlm_text_model, hash_file=False)
    wide = dataclasses.replace(smol, n_embd=2048)  # e.g. the synthetic Qwen3-30B-A3B
    assert verify_projector(resolve_mmproj("synth:tiny", "w", smol), text_model=smol, where="w").projection_dim == 576
    assert verify_projector(resolve_mmproj("synth:tiny", "w", wide), text_model=wide, where="w").projection_dim == 2048
    with pytest.raises(ConfigError, match=r"unknown synthetic projector 'huge'; known: smolvlm-256m, tiny"):
        resolve_mmproj("synth:huge", "m.toml:models.m.mmproj", smol)
