"""Run scripts/train.py or scripts/inpaint.py with the GPU memory this process may take held to a cap, so an
over-large run fails with a real CUDA out-of-memory error on any card, in seconds (bench/gpu_check.py's OOM
cases; what the user sees is the script's stderr and exit code).

    python -m bench.oom_child --cap-gib 20 train model=shallow_flux trainer.batch_size=64 ...

--emulate (the CPU dry run, where no CUDA allocator exists): a convolution or attention whose input passes the cap
raises torch.OutOfMemoryError with the allocator's wording instead of running. It exercises the same handling;
only a CUDA run proves the allocator's own error takes that path.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train": ROOT / "scripts" / "train.py", "inpaint": ROOT / "scripts" / "inpaint.py"}


def cap_cuda_memory(cap_gib: float) -> None:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), 0)


def emulate_cap(cap_gib: float) -> None:
    import torch
    import torch.nn.functional as F

    limit = cap_gib * 2**30

    def capped(op):  # type: ignore[no-untyped-def]
        def run(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
            size = tensor.numel() * tensor.element_size()
            if size > limit:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {size / 2**20:.2f} MiB "
                    f"(emulated on CPU: the cap is {cap_gib * 1024:g} MiB)"
                )
            return op(tensor, *args, **kwargs)

        return run

    # Looked up on torch.nn.functional at call time by torch's Conv2d and diffusers' attention processors.
    F.conv2d = capped(F.conv2d)
    F.scaled_dot_product_attention = capped(F.scaled_dot_product_attention)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-gib", type=float, required=True)
    parser.add_argument("--emulate", action="store_true", help="CPU: emulate the cap in attention")
    parser.add_argument("task", choices=sorted(SCRIPTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.emulate:
        emulate_cap(args.cap_gib)
    else:
        cap_cuda_memory(args.cap_gib)
    script = SCRIPTS[args.task]
    sys.argv = [str(script), *args.overrides]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
