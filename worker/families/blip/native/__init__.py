"""Native kernels, built on first use with the C compiler: the vision encoders' fused self-attention (attention.c)
and the int8 layers' input quantizer (quantize.c: two parallel passes over bfloat16, about 5x PyTorch's way; one
pass where the scale was calibrated beforehand).

PyTorch's CPU attention writes each head's (tokens x tokens) scores to memory and reads them back twice; the
kernel keeps them in the L2 cache a block of query rows at a time (about 1.5x PyTorch's attention here, in
float32 and bfloat16; see attention.c). It needs AVX-512 (and AVX-512 BF16 for bfloat16), a C compiler (`cc`,
or `CC`) and heads of 64. Where any of that is missing, or `MODTAG_NATIVE_KERNELS=false` (the engine's
`native_kernels`), the engine runs PyTorch's attention (and int8 layers PyTorch's quantizer) as before, and
nothing else changes.

The library is compiled once per source and flags into the user's cache directory (about a second) and loaded
with ctypes; it links the OpenMP runtime PyTorch has already loaded, so it runs on PyTorch's threads. An image
without a compiler builds it beside its source when the image is built (`python -m worker.families.blip.native`, as
deploy/docker/Dockerfile.worker does); a library found there is used first.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention.c")
HEAD_SIZE = 64
# Portable to any CPU with these, not tuned to the building one: an image can build it once for its fleet.
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-fopenmp", "-shared", "-fPIC")
_ENTRY = {torch.float32: "modtag_attention_f32", torch.bfloat16: "modtag_attention_bf16"}
_build_lock = threading.Lock()


class NativeAttention:
    """softmax(q k^T * scale) v over (images, heads, tokens, 64) strided views, into (images, tokens, heads, 64)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._functions = {}
        for dtype, name in _ENTRY.items():
            function = getattr(library, name)
            function.restype = ctypes.c_int
            pointer, size = ctypes.c_void_p, ctypes.c_int64
            function.argtypes = [pointer] * 8 + [size, size, size, ctypes.c_float, ctypes.c_int]
            self._functions[dtype] = function

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        # Through the operator registered below: profilers and FLOP counters see it as one PyTorch op.
        result: torch.Tensor = torch.ops.modtag.vision_attention(query, key, value, scale)
        return result

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        images, heads, tokens, size = query.shape
        out = torch.empty((images, tokens, heads, size), dtype=query.dtype)
        status = self._functions[query.dtype](
            query.data_ptr(),
            _strides(query),
            key.data_ptr(),
            _strides(key),
            value.data_ptr(),
            _strides(value),
            out.data_ptr(),
            _strides(out.transpose(1, 2)),
            images,
            heads,
            tokens,
            scale,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("native attention: could not allocate its per-thread buffers")
        return out

    def supports(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Whether these operands suit the kernel (else the caller runs PyTorch's attention)."""
        return (
            query.dtype in self._functions
            and cpu_supports(query.dtype)
            and query.device.type == "cpu"
            and query.shape[-1] == HEAD_SIZE
            and query.shape == key.shape == value.shape
            and all(t.dtype == query.dtype and t.stride(-1) == 1 for t in (key, value))
            and query.stride(-1) == 1
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))
        )


def native_attention() -> NativeAttention | None:
    """The kernel, built and loaded on first use; None where it cannot run here (logged once, with the reason)."""
    library = _load()
    return None if library is None else library.attention


@lru_cache(maxsize=4)
def cpu_supports(dtype: torch.dtype) -> bool:
    """AVX-512 (float32), plus AVX-512 BF16 (bfloat16), from the kernel flags of this CPU."""
    flags = _cpu_flags()
    needed = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma"}
    if dtype == torch.bfloat16:
        needed.add("avx512_bf16")
    return needed <= flags


def build(directory: Path | None = None) -> Path:
    """Compile the sources (unless built already, here or beside them); the library's path. OSError on failure."""
    texts = [source.read_text() for source in _sources()]
    name = f"attention-{hashlib.sha256(chr(0).join([*texts, *FLAGS]).encode()).hexdigest()[:16]}.so"
    target = (directory or _cache_dir()) / name
    for built in (target, SOURCE.with_name(name)):
        if built.exists():
            return built
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler ({compiler!r} is not on PATH); install one (e.g. gcc) or set CC")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as partial:
        pass
    try:
        done = subprocess.run(
            [compiler, *FLAGS, "-o", partial.name, *map(str, _sources())], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise OSError(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(partial.name, target)  # atomic: concurrent builders each write their own file
    finally:
        Path(partial.name).unlink(missing_ok=True)
    return target


@torch.library.custom_op("modtag::vision_attention", mutates_args=(), device_types="cpu")
def _vision_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    kernel = native_attention()
    if kernel is None:  # only reached through a NativeAttention, which exists only once loaded
        raise RuntimeError("native attention called where it could not be loaded")
    return kernel.run(query, key, value, scale)


@_vision_attention_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    images, heads, tokens, size = query.shape
    return query.new_empty((images, tokens, heads, size))


class NativeQuantizer:
    """bfloat16 rows to uint8 with one scale and zero point over them (the range widened to hold 0)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._function = library.modtag_quantize_bf16
        self._function.restype = ctypes.c_int
        self._function.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_double),
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_int,
        ]

        self._static = library.modtag_quantize_bf16_static
        self._static.restype = ctypes.c_int
        self._static.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_double,
            ctypes.c_int64,
            ctypes.c_int,
        ]

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        rows = rows.contiguous()
        out = torch.empty(rows.shape, dtype=torch.uint8)
        scale, zero = ctypes.c_double(), ctypes.c_int64()
        threads = torch.get_num_threads()
        self._function(rows.data_ptr(), rows.numel(), out.data_ptr(), ctypes.byref(scale), ctypes.byref(zero), threads)
        return out, scale.value, zero.value

    def static(self, rows: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        """bfloat16 rows to uint8 with a given scale and zero point (calibrated): one pass, saturating."""
        rows = rows.contiguous()
        out = torch.empty(rows.shape, dtype=torch.uint8)
        self._static(rows.data_ptr(), rows.numel(), out.data_ptr(), scale, zero_point, torch.get_num_threads())
        return out


def native_quantizer() -> NativeQuantizer | None:
    """The int8 layers' bfloat16 input quantizer; None where the native library cannot run here or is off."""
    if not _quantizer_enabled:
        return None
    library = _load()
    return None if library is None or not cpu_supports(torch.bfloat16) else library.quantizer


def enable(on: bool) -> None:
    """Whether int8 layers may quantize with the library: `MODTAG_NATIVE_KERNELS`, process-wide (the worker sets it).

    The attention kernel is chosen per engine (`Engine(native_kernels=...)`).
    """
    global _quantizer_enabled
    _quantizer_enabled = on


# Helpers.

_quantizer_enabled = True


@dataclass(frozen=True)
class _Library:
    attention: NativeAttention
    quantizer: NativeQuantizer


def _sources() -> tuple[Path, ...]:
    # Compiled into the same library beside the attention: the int8 layers' input quantizer (blip/quant.py).
    return (SOURCE, SOURCE.with_name("quantize.c"))


@lru_cache(maxsize=1)
def _load() -> _Library | None:
    if not cpu_supports(torch.float32):
        log.info("native kernels: this CPU lacks AVX-512; PyTorch's attention and int8 quantizer run instead")
        return None
    with _build_lock:
        try:
            library = ctypes.CDLL(str(build()))
        except OSError as exc:
            log.warning("native kernels unavailable, PyTorch's attention and int8 quantizer run instead: %s", exc)
            return None
    return _Library(NativeAttention(library), NativeQuantizer(library))


def _cache_dir() -> Path:
    import platformdirs

    directory = Path(platformdirs.user_cache_dir("modtag", appauthor=False)) / "native"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"modtag-native-{os.getuid()}"


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _strides(tensor: torch.Tensor) -> ctypes.Array[ctypes.c_int64]:
    return (ctypes.c_int64 * 3)(tensor.stride(0), tensor.stride(1), tensor.stride(2))


if __name__ == "__main__":  # python -m worker.families.blip.native: build beside the source (an image's build step)
    print(build(SOURCE.parent))
