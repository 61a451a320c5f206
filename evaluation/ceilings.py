"""The ceilings a roofline floor divides by, measured on the machine that runs (METHOD.md: "measure
the two ceilings once on the device machine ... and use those"), with the vendor's datasheet
figures beside them as a second column that no ratio is computed from.

Three measurements, each the median of ``repeats`` timed runs after a warm-up, on random data
(never zeros), each input several times larger than the L2 cache:

- ``copy``: ``dst.copy_(src)`` of one large fp16 tensor (1 GiB on a GPU), bytes read plus bytes
  written (2 x the tensor) over the time. The floors are computed from this one.
- ``gemv``: a batch-1 vector through ``F.linear`` with fp16 matrices of Pythia-2.8B's MLP shapes
  (10240 x 2560 up, 2560 x 10240 down; ten of them, 0.52 GB, so no matrix is read from L2 twice
  in a row), the bytes of matrices and vectors over the time: what a decode step's projections
  can reach with the library's own GEMV kernels. A second floor is given from it.
- ``matmul``: an fp16 (bf16-rate) square matrix product (8192^3 on a GPU), 2 n^3 FLOPs over the
  time: the compute ceiling, which only large batches reach.

On a GPU each timed run is queued behind ``torch.cuda._sleep`` so the host's launches are all
queued before the first event fires, and timed by CUDA events; on the CPU (tests) the sizes are
small and a host clock times them.
"""

import functools
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

# name: (dense fp16/bf16 tensor FLOP/s, memory bytes/s, source). Leads, not ceilings.
DATASHEETS = {
    "a100-sxm-80gb": (312e12, 2.039e12, "NVIDIA A100 SXM 80GB datasheet: dense FP16 tensor, HBM2e"),
    "h100-sxm": (989e12, 3.35e12, "NVIDIA H100 SXM datasheet: dense BF16/FP16 tensor, HBM3"),
    "h200": (989e12, 4.8e12, "NVIDIA H200 SXM datasheet: dense BF16/FP16 tensor, HBM3e"),
}
# What the H100 results under results/*_h100* divided by (measured there once, KINDS.md: an 8192^3
# bf16 matmul and a device-to-device copy); kept so those files' floors can be reproduced.
RECORDED = {"h100-measured": (798e12, 3.0e12, "measured once on this project's H100 (KINDS.md), used by the "
                                              "H100 result files")}


def datasheet_for(device_name: str | None) -> str | None:
    """The DATASHEETS entry for a CUDA device name (``torch.cuda.get_device_name()``), if known."""
    name = (device_name or "").upper()
    if "H200" in name:
        return "h200"
    if "H100" in name and "PCIE" not in name:
        return "h100-sxm"
    if "A100" in name and "80GB" in name and "PCIE" not in name:
        return "a100-sxm-80gb"
    return None


@dataclass(frozen=True)
class Ceilings:
    """What floors divide by. ``bandwidth`` (bytes/s) and ``peak_flops`` are the ones the floor
    uses; ``gemv_bandwidth`` gives the second floor; ``datasheet`` names a DATASHEETS entry for
    the third column; ``details`` holds the measurements' sizes and samples."""

    bandwidth: float
    peak_flops: float
    source: str
    gemv_bandwidth: float | None = None
    datasheet: str | None = None
    details: dict = field(default_factory=dict, compare=False)

    def summary(self) -> dict:
        """The figures a result row carries (TB/s and TFLOP/s), details left out."""
        return {"copy_tb_per_s": self.bandwidth / 1e12,
                "gemv_tb_per_s": None if self.gemv_bandwidth is None else self.gemv_bandwidth / 1e12,
                "matmul_tflops": self.peak_flops / 1e12, "ceilings_source": self.source,
                "datasheet": self.datasheet}

    def to_json(self) -> dict:
        return asdict(self)


def given(bandwidth: float, peak_flops: float, gemv_bandwidth: float | None = None,
          datasheet: str | None = None) -> Ceilings:
    """Ceilings given by hand (a reproduction, a test), not measured."""
    return Ceilings(bandwidth, peak_flops, "given", gemv_bandwidth, datasheet)


def named(name: str) -> Ceilings:
    """A DATASHEETS or RECORDED entry as ceilings (the roofline CLI's --gpu)."""
    peak, bandwidth, source = (DATASHEETS | RECORDED)[name]
    return Ceilings(bandwidth, peak, source, None, name if name in DATASHEETS else None)


def _median_seconds(run, device: torch.device, repeats: int, warmup: int = 2) -> tuple[float, list[float]]:
    """Median seconds of ``run()`` over ``repeats`` timed calls, and every sample."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda._sleep(2_000_000)  # ~1 ms of GPU busy-wait: every launch below is queued before start fires
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            run()
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples), samples


def random_half(shape, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random normal values made on ``device`` (never zeros: they can run faster than real data)."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def copy_bandwidth(device: torch.device, tensor_bytes: int, repeats: int = 10) -> dict:
    """Bytes/s of ``dst.copy_(src)`` counting read + write (2 x ``tensor_bytes``)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    numel = tensor_bytes // torch.empty((), dtype=dtype).element_size()
    generator = torch.Generator(device).manual_seed(0)
    src = random_half((numel,), device, dtype, generator)
    dst = torch.empty_like(src)
    seconds, samples = _median_seconds(lambda: dst.copy_(src), device, repeats)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return {"bytes_per_s": moved / seconds, "bytes_moved": moved, "median_s": seconds, "samples_s": samples,
            "dtype": str(dtype)}


def gemv_bandwidth(device: torch.device, rows: int, cols: int, matrices: int, repeats: int = 10) -> dict:
    """Bytes/s of batch-1 ``F.linear`` through ``matrices`` distinct matrices, half (rows, cols)
    and half (cols, rows), each read once per pass; bytes = matrices + input and output vectors."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(1)
    shapes = [(rows, cols) if index % 2 == 0 else (cols, rows) for index in range(matrices)]
    weights = [random_half(shape, device, dtype, generator) * 0.02 for shape in shapes]
    inputs = {n: random_half((1, n), device, dtype, generator) for n in {rows, cols}}

    def run():
        for weight in weights:
            F.linear(inputs[weight.shape[1]], weight)

    seconds, samples = _median_seconds(run, device, repeats)
    size = torch.empty((), dtype=dtype).element_size()
    moved = sum(size * (r * c + r + c) for r, c in shapes)
    del weights, inputs
    return {"bytes_per_s": moved / seconds, "bytes_moved": moved, "median_s": seconds, "samples_s": samples,
            "shapes": shapes, "dtype": str(dtype)}


def matmul_rate(device: torch.device, n: int, repeats: int = 10) -> dict:
    """FLOP/s of an (n, n) @ (n, n) product (2 n^3 FLOPs), fp16 on a GPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(2)
    a, b = random_half((n, n), device, dtype, generator), random_half((n, n), device, dtype, generator)
    seconds, samples = _median_seconds(lambda: a @ b, device, repeats)
    del a, b
    return {"flops_per_s": 2 * n**3 / seconds, "n": n, "median_s": seconds, "samples_s": samples, "dtype": str(dtype)}


# (copy tensor bytes, GEMV rows, cols, matrices, matmul n) per device type
SIZES = {"cuda": (2**30, 10240, 2560, 10, 8192), "cpu": (8 * 2**20, 1024, 256, 4, 256)}


def measure(device: str | torch.device, repeats: int = 10) -> Ceilings:
    """Measure copy, GEMV and matmul ceilings on ``device`` now (about a second on a GPU)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    copy_bytes, rows, cols, matrices, n = SIZES["cuda" if device.type == "cuda" else "cpu"]
    with torch.no_grad():
        copy = copy_bandwidth(device, copy_bytes, repeats)
        gemv = gemv_bandwidth(device, rows, cols, matrices, repeats)
        matmul = matmul_rate(device, n, repeats)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Ceilings(copy["bytes_per_s"], matmul["flops_per_s"], f"measured on {name} at the run's start",
                    gemv["bytes_per_s"], datasheet_for(name),
                    {"device": name, "copy": copy, "gemv": gemv, "matmul": matmul})


@functools.cache
def _measured_once(device: str) -> Ceilings:
    return measure(device)


def machine_ceilings(device: str | torch.device) -> Ceilings:
    """``measure(device)``, once per process and device: every cell of a run divides by the same
    figures, measured before its first cell."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _measured_once(str(device))
