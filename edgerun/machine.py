"""Facts about the machine a latency was measured on, readable on a desktop, a server and a Jetson.

Every number the project reports is recorded beside these: the CPU and its SIMD width, the cores
this process may use, the load average, the GPU (nvidia-smi, else the CUDA driver) and, on a
Jetson, the power mode and clocks. Nothing here raises: a fact that cannot be read is None.
Runtime code: no torch, pipeline, export or calib imports.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

# The flags that change which kernels onnxruntime and torch pick on x86.
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
# x86 int8 dot products that accumulate straight into int32 (VNNI's vpdpbusd, AMX tiles).
INT32_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
X86 = ("x86_64", "amd64", "i386", "i686")


def _cpuinfo() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/cpuinfo").read_text()
    return ""


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith(("model name", "Model")):  # x86 | ARM (Jetson: "Model : NVIDIA Jetson ...")
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (x86 "flags", ARM "Features"); empty where unknown."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def simd_block(flags: frozenset[str] | None = None) -> int:
    """Channels per SIMD register of float32: 16 on AVX-512, 8 on AVX2, 4 otherwise (SSE, NEON).

    onnxruntime's blocked (NCHWc) convolutions step their cost every this-many output channels,
    so a pruning search rounds channel counts to it.
    """
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        return 16
    if "avx2" in flags:
        return 8
    return 4


def int16_int8_dot(flags: frozenset[str] | None = None, arch: str | None = None) -> bool:
    """Whether this CPU's fast int8 dot product sums pairs of u8*s8 products in int16 (which saturates).

    x86 without VNNI or AMX (AVX2, AVX-512 before Cascade Lake, SSE) has only vpmaddubsw for it;
    onnxruntime's u8s8 kernels use it there. VNNI/AMX accumulate in int32 and ARM widens first.
    An x86 CPU whose flags cannot be read counts as saturating: the safe answer.
    """
    if (arch or platform.machine()).lower() not in X86:
        return False
    flags = cpu_flags() if flags is None else flags
    return not any(f in flags for f in INT32_DOT_FLAGS)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), else all logical cores."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def physical_cores() -> int | None:
    """Physical cores (psutil; else distinct (physical id, core id) pairs of /proc/cpuinfo)."""
    with contextlib.suppress(Exception):
        import psutil
        n = psutil.cpu_count(logical=False)
        if n:
            return n
    pairs, phys = set(), "0"
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            pairs.add((phys, value.strip()))
    return len(pairs) or None


def load_average() -> tuple[float, float, float] | None:
    """1, 5 and 15-minute load averages, rounded; None where the OS has none."""
    with contextlib.suppress(OSError, AttributeError):
        return tuple(round(v, 2) for v in os.getloadavg())
    return None


def oversubscribed(threads: int, *, processes: int = 1, cores: int | None = None,
                   load: tuple[float, ...] | None = None) -> str | None:
    """Why ``threads`` threads in each of ``processes`` concurrent processes cannot all run, or None.

    Multi-threaded runtimes (OpenMP in torch) wait for every thread at each operator: when the
    threads outnumber the free cores, one descheduled thread stalls the rest and a time measures
    the scheduler, not the model. A busy machine (1-minute load at or above the cores) counts too.
    """
    cores = cores or usable_cores()
    if threads * processes > cores:
        return f"{threads} threads x {processes} process(es) > {cores} cores"
    if threads > 1 and load and load[0] >= cores:
        return f"{threads} threads on a busy machine (load {load[0]} >= {cores} cores)"
    return None


def run_command(cmd: list[str], timeout: float = 5.0) -> str | None:
    """stdout+stderr of ``cmd`` (trimmed) if the program exists; None otherwise. Never raises."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except Exception as e:  # timeout, permissions: record, never fail a measurement
        return f"({cmd[0]} failed: {type(e).__name__})"
    text = (p.stdout + ("\n" + p.stderr if p.stderr.strip() else "")).strip()
    if p.returncode != 0:
        text = f"(exit {p.returncode}) {text}"
    return text[:2000]


def jetson_info() -> dict | None:
    """Power mode and clocks on a Jetson (``nvpmodel -q``, ``jetson_clocks --show``); None elsewhere."""
    release = None
    with contextlib.suppress(OSError, IndexError):
        release = Path("/etc/nv_tegra_release").read_text().splitlines()[0].strip()
    nvp = run_command(["nvpmodel", "-q"])
    clocks = run_command(["jetson_clocks", "--show"])
    if release is None and nvp is None and clocks is None:
        return None
    return {"l4t_release": release, "nvpmodel": nvp, "jetson_clocks": clocks}


def gpu_info() -> dict | None:
    """Name, driver, memory and clocks of GPU 0 from nvidia-smi, else from the CUDA driver; None if none.

    JetPack has no nvidia-smi: there the CUDA driver (through edgerun.trt) gives name and compute
    capability.
    """
    smi = run_command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,"
                       "power.limit", "--format=csv,noheader"])
    if smi and not smi.startswith("("):
        keys = ("name", "driver", "memory_total", "clock_sm", "clock_mem", "power_limit")
        return dict(zip(keys, (v.strip() for v in smi.splitlines()[0].split(",")), strict=False))
    with contextlib.suppress(Exception):
        from edgerun import trt  # written by another part of the project; absent means "unknown"
        dev = trt.cuda_device()
        if dev:
            return {"name": dev[0], "compute_capability": dev[1]}
    return None


def gpu_used_mb() -> float | None:
    """Device-wide used memory of GPU 0 (nvidia-smi, so other processes count too), or None."""
    out = run_command(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"])
    try:
        return float(out.splitlines()[0]) if out else None
    except (ValueError, IndexError):
        return None


def rss_mb() -> float | None:
    """The process's current resident set in MiB (psutil; /proc/self/statm without it)."""
    with contextlib.suppress(Exception):
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return None


def peak_rss_mb() -> float | None:
    """The process's peak resident set so far (ru_maxrss is KiB on Linux)."""
    with contextlib.suppress(Exception):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return None


def trim_heap() -> None:
    """Give freed heap back to the OS (glibc), so the next RSS delta starts clean."""
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class Machine:
    """What changes a latency number, recorded beside it."""
    cpu: str
    simd: tuple[str, ...]          # the SIMD_FLAGS this CPU has
    simd_block: int
    logical_cores: int | None
    physical_cores: int | None
    usable_cores: int
    load_average: tuple[float, float, float] | None
    platform: str
    python: str
    gpu: dict | None
    jetson: dict | None

    def to_json(self) -> dict:
        return asdict(self)


def machine() -> Machine:
    flags = cpu_flags()
    return Machine(cpu=cpu_name(), simd=tuple(f for f in SIMD_FLAGS if f in flags), simd_block=simd_block(flags),
                   logical_cores=os.cpu_count(), physical_cores=physical_cores(), usable_cores=usable_cores(),
                   load_average=load_average(), platform=platform.platform(), python=platform.python_version(),
                   gpu=gpu_info(), jetson=jetson_info())


# The libraries whose versions change what the project measures or writes.
LIBRARIES = ("torch", "torch-pruning", "onnx", "onnxruntime", "onnxruntime-gpu", "nncf", "numpy", "polygraphy",
             "onnxconverter-common", "tensorrt", "psutil")


def library_versions(names=LIBRARIES) -> dict:
    """{distribution: version} for those installed here (metadata only: nothing is imported)."""
    from importlib import metadata
    out = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out
