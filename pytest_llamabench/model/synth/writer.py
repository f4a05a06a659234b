"""Writing a synthetic GGUF: metadata through gguf's GGUFWriter, then tensor data in large,
aligned sequential writes (O_DIRECT where allowed), hashed on the fly, so a ~20 GB file
takes well under a minute."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import shutil
import threading
import time
import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_llamabench.errors import ConfigError
from pytest_llamabench.model.synth.blocks import BlockPattern, f32_values
from pytest_llamabench.model.synth.shapes import ModelShape, Recipe, TensorPlan, get_recipe, get_shape, plan_tensors
from pytest_llamabench.model.synth.vocab import Vocab, synthetic_vocab

if TYPE_CHECKING:
    import gguf

Log = Callable[[str], None]
Chunk = bytes | memoryview

GGUF_ALIGNMENT = 32
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_STAGE_BYTES = 16 * 1024 * 1024  # one write
_DIRECT_ALIGN = 4096  # O_DIRECT length and offset alignment
_GB = 1e9


class _SequentialWriter:
    """Writes a file front to back through a page-aligned staging buffer, hashing it on the way.

    Writes are whole, aligned buffers with O_DIRECT where the file system allows it: on a
    busy host, buffered writes of 20 GB cost minutes of kernel time in page-cache work.
    A second thread sha256es the same (immutable) buffers; both drop the GIL.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd, self._direct = _open_direct(path)
        self._stage = mmap.mmap(-1, _STAGE_BYTES)
        self._view = memoryview(self._stage)
        self._fill = 0
        self.position = 0
        self._sha = hashlib.sha256()
        self._queue: queue.Queue[Chunk | None] = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._hash_loop, name="synth-sha256", daemon=True)
        self._thread.start()

    def __enter__(self) -> _SequentialWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._view.release()
        self._stage.close()

    def _hash_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            self._sha.update(item)

    def write(self, data: Chunk) -> None:
        """Append immutable ``data`` to the file and the hash."""
        self._queue.put(data)
        src = memoryview(data)
        done = 0
        while done < len(src):
            n = min(len(src) - done, _STAGE_BYTES - self._fill)
            self._view[self._fill : self._fill + n] = src[done : done + n]
            self._fill += n
            done += n
            if self._fill == _STAGE_BYTES:
                self._flush(_STAGE_BYTES)
        self.position += len(src)

    def pad(self) -> None:
        """Zero-pad to the GGUF data alignment."""
        if n := -self.position % GGUF_ALIGNMENT:
            self.write(bytes(n))

    def finish(self) -> str:
        """Write what is staged, cut the file to its length, return its sha256."""
        if self._fill:
            whole = -(-self._fill // _DIRECT_ALIGN) * _DIRECT_ALIGN
            self._view[self._fill : whole] = bytes(whole - self._fill)
            self._flush(whole)
        os.ftruncate(self._fd, self.position)
        self._queue.put(None)
        self._thread.join()
        return self._sha.hexdigest()

    def _flush(self, length: int) -> None:
        try:
            written = os.write(self._fd, self._view[:length])
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._direct:
                raise
            self._reopen_buffered()  # the file system took O_DIRECT at open but not at write
            written = os.write(self._fd, self._view[:length])
        if written != length:
            raise OSError("short write to the synthetic model (disk full?)")
        self._fill = 0

    def _reopen_buffered(self) -> None:
        offset = os.lseek(self._fd, 0, os.SEEK_CUR)
        os.close(self._fd)
        self._fd, self._direct = os.open(self._path, os.O_WRONLY), False
        os.lseek(self._fd, offset, os.SEEK_SET)


def _open_direct(path: Path) -> tuple[int, bool]:
    """Open ``path`` for writing from its start, with O_DIRECT where available; say which."""
    flags = os.O_WRONLY | os.O_CREAT
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError:
            pass  # tmpfs and some others refuse O_DIRECT: plain writes work too
    return os.open(path, flags, 0o644), False


def write_synthetic_model(
    shape: str, quant: str, path: Path, *, seed: int = 0, vocab: Path | None = None, log: Log = print
) -> Path:
    """Write ``path``: a GGUF with ``shape``'s tensors under recipe ``quant`` and random weights.

    Written to ``PATH.partial`` and renamed when complete; its sha256, computed while
    writing, goes into the project's sha256 cache so verifying it later costs no re-read.
    """
    from pytest_llamabench.model.files import record_file_sha256

    model, recipe = get_shape(shape), get_recipe(quant)
    plans = plan_tensors(model, recipe.name)
    total = sum(t.nbytes for t in plans)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(path, total)
    partial = path.with_name(path.name + ".partial")
    log(f"writing {path.name}: {model.label} {recipe.label}, {len(plans)} tensors, {total / _GB:.2f} GB")
    start = time.monotonic()
    try:
        _write_metadata(partial, model, recipe, plans, seed, vocab)
        digest = _write_tensor_data(partial, plans, seed, log, start)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    record_file_sha256(path, digest)
    elapsed = time.monotonic() - start
    size = path.stat().st_size
    log(f"wrote {path} ({size / _GB:.2f} GB) in {elapsed:.1f} s ({size / _GB / max(elapsed, 1e-9):.2f} GB/s)")
    return path


def _check_free_space(path: Path, nbytes: int) -> None:
    free = shutil.disk_usage(path.parent).free
    if free < nbytes + 256 * 1024 * 1024:
        raise ConfigError(
            f"{path.parent} has {free / _GB:.1f} GB free; the synthetic model needs {nbytes / _GB:.1f} GB"
        )


def _write_metadata(
    path: Path, model: ModelShape, recipe: Recipe, plans: Sequence[TensorPlan], seed: int, vocab: Path | None
) -> None:
    """Header, key/values and tensor infos, through gguf's GGUFWriter (no tensor data)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, model.arch)
    _add_hparams(writer, model)
    writer.add_name(f"{model.label} synthetic")
    writer.add_type("model")
    writer.add_file_type(recipe.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("llamabench.synthetic.shape", model.name)
    writer.add_string("llamabench.synthetic.recipe", recipe.name)
    writer.add_uint32("llamabench.synthetic.seed", seed)
    _add_tokenizer(writer, synthetic_vocab(model.n_vocab, vocab))
    for t in plans:
        writer.add_tensor_info(
            t.name, tuple(reversed(t.ne)), np.dtype(np.float32), t.nbytes, raw_dtype=gguf.GGMLQuantizationType[t.qtype]
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def _add_hparams(writer: gguf.GGUFWriter, model: ModelShape) -> None:
    writer.add_block_count(model.n_layer)
    writer.add_context_length(model.context_length)
    writer.add_embedding_length(model.n_embd)
    if model.n_ff:
        writer.add_feed_forward_length(model.n_ff)
    writer.add_head_count(model.n_head)
    writer.add_head_count_kv(model.n_head_kv)
    writer.add_key_length(model.head_dim)
    writer.add_value_length(model.head_dim)
    writer.add_rope_freq_base(model.rope_theta)
    writer.add_layer_norm_rms_eps(model.rms_eps)
    writer.add_expert_count(model.n_expert)
    writer.add_expert_used_count(model.n_expert_used)
    writer.add_expert_feed_forward_length(model.n_ff_exp)
    if model.n_ff_shexp:
        writer.add_expert_shared_feed_forward_length(model.n_ff_shexp)
    if model.rope_dim:
        writer.add_rope_dimension_count(model.rope_dim)
    if model.rope_sections:
        writer.add_rope_dimension_sections(list(model.rope_sections))
    if (lin := model.linear) is not None:
        writer.add_ssm_conv_kernel(lin.conv_kernel)
        writer.add_ssm_state_size(lin.state_size)
        writer.add_ssm_group_count(lin.group_count)
        writer.add_ssm_time_step_rank(lin.time_step_rank)
        writer.add_ssm_inner_size(lin.inner_size)
        writer.add_full_attention_interval(lin.full_attention_interval)


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def _write_tensor_data(path: Path, plans: Sequence[TensorPlan], seed: int, log: Log, start: float) -> str:
    """Append every tensor's data (aligned) to the metadata at ``path``; return the file's sha256."""
    import numpy as np

    rng = np.random.default_rng(seed)
    patterns: dict[str, BlockPattern] = {}
    total = sum(t.nbytes for t in plans)
    done, next_report = 0, total / 10
    metadata = path.read_bytes()  # what GGUFWriter wrote; rewritten in place so every write is aligned
    with _SequentialWriter(path) as out:
        out.write(metadata)
        out.pad()
        for index, t in enumerate(plans):
            if t.qtype == "F32":
                out.write(f32_values(t.name, t.n_elements, rng).tobytes())
            else:
                if t.qtype not in patterns:
                    patterns[t.qtype] = BlockPattern(t.qtype, rng)
                for chunk in patterns[t.qtype].chunks(t.nbytes, start_block=index * 7919):
                    out.write(chunk)
            out.pad()
            done += t.nbytes
            if total > _GB and done >= next_report:
                log(f"  {done / _GB:6.2f} / {total / _GB:.2f} GB  ({time.monotonic() - start:.1f} s)")
                next_report += total / 10
        return out.finish()


@contextlib.contextmanager
def gguf_file(path: Path, arch: str) -> Iterator[gguf.GGUFWriter]:
    """``with gguf_file(path, arch) as writer: writer.add_…``: a small GGUF written by gguf's own
    writer (header, key/values, tensors) into ``path.<pid>.part``, then moved to ``path`` — a reader
    (or another xdist worker) never sees half a file. Nothing is left behind if the block raises."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
