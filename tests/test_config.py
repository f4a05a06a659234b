"""Matrix files: validation into frozen objects, and one clear error per mistake."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pytest_llamabench.config import HostMemoryContext, load_matrix, parse_size
from pytest_llamabench.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
from tests.matrices import HEAD
from tests.matrices import config_error as error
from tests.matrices import load_text as load


def test_full_matrix_is_valid_and_varies_what_the_user_varied() -> None:
    matrix = load_matrix([REPO / "configs/full.toml"])
    assert len(matrix.configs) >= 7
    assert list(matrix.workloads) == ["short", "medium", "long", "multi-turn"]
    values = {key: {str(c.server.get(key)) for c in matrix.configs.values()}
              for key in ("threads", "cache_type_k", "ctx", "ubatch", "flash_attn")}  # fmt: skip
    assert all(len(v) > 1 for v in values.values()), values
    assert any(c.override_tensor == ("exps=CPU",) for c in matrix.configs.values())
    assert any("n_cpu_moe" in c.server for c in matrix.configs.values())
    oom = [c for c in matrix.configs.values() if c.expect == "oom"]
    assert len(oom) == 1 and isinstance(oom[0].server["ctx"], HostMemoryContext)


def test_quick_default_matrix_shows_every_feature_once() -> None:
    """The README's main command (issue 18): every workload kind, a quality row with a quant
    that fails it, an expected OOM, and the configs the winner rule chooses between."""
    matrix = load_matrix([REPO / "configs/default.toml"])
    kinds = {w.kind for w in matrix.workloads.values()}
    assert {"completion", "chat", "perplexity", "vision", "template"} <= kinds, kinds
    assert any(w.load is not None for w in matrix.workloads.values())
    assert [c.name for c in matrix.configs.values() if c.expect == "oom"] == ["oom-ctx"]
    quality = matrix.workloads["quality"]
    assert quality.quality is not None and quality.quality.reference is not None
    assert quality.quality.reference.name == "smollm2"
    assert {"base", "q4km", "q2"} <= set(quality.configs)
    assert matrix.configs["q2"].model.quantize is not None  # made by llama-quantize, fails quality
    assert matrix.configs["vlm"].model.mmproj is not None


def test_extends_defaults_and_pinned_server_defaults(tmp_path: Path) -> None:
    matrix = load(tmp_path, """
[configs.C2]
n_cpu_moe = 16
cache_type_k = "q8_0"
expect = "oom"
description = "parent"
[configs.C2a]
extends = "C2"
n_cpu_moe = 32
""")  # fmt: skip
    c2a = matrix.configs["C2a"]
    assert c2a.server["n_cpu_moe"] == 32 and c2a.server["cache_type_k"] == "q8_0"
    assert c2a.expect is None and c2a.description == ""  # not inherited: they describe one config
    args = c2a.server_args()
    assert args[args.index("--parallel") + 1] == "1" and args[args.index("--fit") + 1] == "off"
    assert args[args.index("--n-gpu-layers") + 1] == "0"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c2a.name = "x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[configs.a]\nthreds = 2\n", "m.toml:configs.a.threds: unknown key; did you mean 'threads'?"),
        ("[configs.a]\nthreads = \"2\"\n", "m.toml:configs.a.threads: expected int, got str '2'"),
        ("[configs.a]\nmodel = \"nope\"\n", "m.toml:configs.a.model: unknown model 'nope'; known models: m"),
        ("[configs.a]\nextends = \"zz\"\n", "m.toml:configs.a.extends: unknown config 'zz'; known configs: a"),
        ("[configs.a]\nextends = \"b\"\n[configs.b]\nextends = \"a\"\n", "cycle in extends: a -> b -> a"),
        ("[configs.a]\ncache_type_k = \"q9\"\n", "'q9' is not one of f32, f16"),
        ("[configs.a]\nexpect = \"slow\"\n", "m.toml:configs.a.expect: 'slow' is not one of oom"),
        ("[configs.a]\nthresholds = { min_tok_s = 3 }\n", "configs.a.thresholds.min_tok_s: unknown key"),
        ("[configs.a]\nvram_budget = \"lots\"\n", "configs.a.vram_budget: 'lots' is not a size"),
        ("[configs.a]\nargs = [\"--host\", \"0.0.0.0\"]\n", "m.toml:configs.a.args: --host 0.0.0.0 makes llama-server listen beyond this machine"),
        ("[configs.a]\nargs = [\"--host=10.0.0.5\"]\n", "set allow_public_host = true in this config if you mean it"),
        ("[workloads.w]\ntimeout_s = 0\n", "m.toml:workloads.w.timeout_s: must be > 0 seconds"),
        ("[configs.a]\nrestarts = 0\n", "m.toml:configs.a.restarts: 0 fresh servers cannot be measured; use restarts >= 1"),
        ("[workloads.w]\nkind = \"completion\"\nturns = 3\n", "workloads.w.turns: only chat workloads have turns"),
    ],
)
def test_errors_name_file_key_and_fix(tmp_path: Path, text: str, message: str) -> None:
    assert message in error(tmp_path, text)


def test_malformed_toml_has_line_number(tmp_path: Path) -> None:
    assert "m.toml: invalid TOML: " in error(tmp_path, "[configs.a\n")
    assert "line 6" in error(tmp_path, "[configs.a\n")


def test_models_dir_and_selection(tmp_path: Path) -> None:
    path = tmp_path / "q.toml"
    path.write_text('[models.q]\nfile = "Q4.gguf"\n[defaults]\nmodel = "q"\nctx = 1\n[configs.C7]\n[configs.C8]\n[configs.C1]\n')
    with pytest.raises(ConfigError, match="no models dir is set; pass --llamabench-models-dir"):
        load_matrix([path])
    matrix = load_matrix([path], models_dir=tmp_path / "models")
    assert matrix.configs["C7"].model.path == tmp_path / "models/Q4.gguf"
    assert [c.name for c in matrix.select_configs(["C[78]"], "--llamabench-config")] == ["C7", "C8"]
    with pytest.raises(ConfigError, match="no config matches 'C9'; known configs: C7, C8, C1"):
        matrix.select_configs(["C9"], "--llamabench-config")


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    for p in (a, b):
        p.write_text(HEAD + "[configs.C7]\n")
    with pytest.raises(ConfigError, match="config 'C7' is also defined in .*a.toml"):
        load_matrix([a, b])


def test_thresholds_per_workload_merge(tmp_path: Path) -> None:
    matrix = load(tmp_path, """
[configs.a.thresholds]
min_gen_tok_s = 10
max_ttft_ms = 500
[configs.a.thresholds.long]
max_ttft_ms = 2000
""")  # fmt: skip
    config = matrix.configs["a"]
    assert dict(config.thresholds_for("long").items()) == {"min_gen_tok_s": 10.0, "max_ttft_ms": 2000.0}
    assert dict(config.thresholds_for("short").items()) == {"min_gen_tok_s": 10.0, "max_ttft_ms": 500.0}


@pytest.mark.parametrize(("text", "value"), [("16GiB", 16 * 2**30), ("512M", 512 * 2**20), ("1.5G", 3 * 2**29), (4096, 4096)])
def test_parse_size(text: object, value: int) -> None:
    assert parse_size(text, "x") == value


def test_user_matrix_file_is_valid(tmp_path: Path) -> None:
    matrix = load_matrix([REPO / "configs/qwen35-35b-a3b.toml"], models_dir=tmp_path)
    assert {"C1", "C2", "C2a", "C2b", "C3", "C5", "C6", "C7", "C8"} <= set(matrix.configs)
    c7 = matrix.configs["C7"]
    assert c7.gpu and c7.server["n_cpu_moe"] == 24 and c7.server["cache_type_k"] == "q8_0"
    assert matrix.configs["C2"].expect == "oom" and matrix.configs["C6"].expect == "oom"
    assert matrix.configs["C1"].override_tensor == ("exps=CPU",)


def test_server_starts_are_interleaved_across_configs(tmp_path: Path) -> None:
    from pytest_llamabench.config import expand_starts

    configs = list(load(tmp_path, "[configs.a]\nrestarts = 3\n[configs.b]\n[configs.c]\nrestarts = 2\n").configs.values())
    assert [c.instance for c in expand_starts(configs)] == ["a@1", "b", "c@1", "a@2", "c@2", "a@3"]
    assert [c.instance for c in expand_starts(configs, restarts=2)] == ["a@1", "b@1", "c@1", "a@2", "b@2", "c@2"]


def test_a_directory_or_non_utf8_matrix_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory, not a matrix file"):
        load_matrix([tmp_path])
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[configs.a]\ndescription = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: not UTF-8 text \(byte 30\)"):
        load_matrix([bad])


def test_a_public_host_is_allowed_when_the_config_says_so(tmp_path: Path) -> None:
    matrix = load(tmp_path, '[configs.a]\nargs = ["--host", "0.0.0.0"]\nallow_public_host = true\n')
    assert matrix.configs["a"].args == ("--host", "0.0.0.0")
