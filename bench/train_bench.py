"""Training step overhead and the latent cache on the tiny models, CPU: `python -m bench.train_bench`.

For FLUX and SDXL at resolution 32 and 64, each case in fresh processes (so peak RSS is the case's own):

1. Step: stylekit's real loop (`Session.train()` on the cached encodings: `_micro_loss`, `accelerator.backward`,
   grad clipping, optimizer and schedule step, progress bar, metrics row) against a bare PyTorch loop doing the
   same work on the same LoRA-wrapped denoiser and batch (the family's `training_loss` forward, `backward()`,
   `clip_grad_norm_`, `AdamW.step()`, `zero_grad()`). stylekit's step is the time between consecutive metric
   rows; one bare step runs after each of stylekit's (so both see the same machine load), after a warm-up of
   each; the median step of each is kept, in wall and in CPU time. Peak RSS: the stylekit process up to its
   first bare step, and a second process that runs only the bare loop after the same loading.
2. Cache: the same bare step when the latents and text embeddings come from the cache (in memory, read once
   from disk) against encoding the image (decode, resize, VAE) and the prompt (text encoders) every step;
   alternating, medians. `cache_load_ms`: reading one example's entries from the on-disk cache.

Torch runs on one thread (OMP_NUM_THREADS=1 unless set): on a shared 2-core machine two threads make the tiny
models' steps an order of magnitude slower and far noisier.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CASES = [("flux", 32), ("flux", 64), ("sdxl", 32), ("sdxl", 64)]
WARMUP = 20  # stylekit steps before anything is timed
PAIRS = 300  # timed steps of each kind, alternating one and one
CACHE_PAIRS = 100
RANK = 4


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("STYLEKIT_CACHE_DIR", str(ROOT / ".stylekit-cache"))
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    return env


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since `start`; CPU time leaves out the time other processes held the core."""
    wall, cpu = _now()
    return wall - start[0], cpu - start[1]


def _medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- one case, in its own process ------------------------------------------------------------------------------


def _session(family_name: str, resolution: int, folder: Path, max_steps: int) -> Any:
    """A Session through its real stages up to training: config, data, models, encodings (via the cache)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from stylekit.data.dataset import dataset_hash, prepare_samples
    from stylekit.train.run import Session

    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(images / "a.png")
    (images / "a.txt").write_text("a photo of a red cat")
    overrides = [
        f"model=tiny_{family_name}",
        f"model.resolution={resolution}",
        "logger=none",
        f"data.dataset_dir={images}",
        f"output_dir={folder / 'run'}",
        f"trainer.cache_dir={folder / 'cache'}",
        f"trainer.checkpoint_root={folder / 'checkpoints'}",
        "trainer.resume=never",
        f"trainer.max_steps={max_steps}",
        f"trainer.checkpoint_every={10**6}",
        f"trainer.validate_every={10**6}",
        f"lora.rank={RANK}",
        f"lora.alpha={RANK}",
        # The bare loop does not recompute activations; compare like with like.
        "trainer.gradient_checkpointing=false",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    family = instantiate(cfg.model)
    samples = prepare_samples(cfg, multiple=family.bucket_multiple, seed=int(cfg.seed))
    session = Session(cfg, family, Path(cfg.output_dir))
    session.identify(dataset_hash({s.record for s in samples}))
    session.prepare_models()
    session.encode(samples, samples[:1], [])
    return session, samples


class BareLoop:
    """The baseline: the same forward, backward and AdamW step, with nothing around them."""

    def __init__(self, session: Any, model: Any) -> None:
        import torch

        opt = session.cfg.optimizer
        self.session, self.model = session, model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=float(opt.lr),
            betas=tuple(opt.betas),
            eps=float(opt.eps),
            weight_decay=float(opt.weight_decay),
        )
        self.max_norm = float(session.trainer.max_grad_norm)
        self.generator = torch.Generator().manual_seed(1)

    def step(self, batch: dict[str, Any]) -> tuple[float, float]:
        import torch

        start = _now()
        family, trainer = self.session.family, self.session.trainer
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=self.generator)
        t = family.sample_timesteps(latents.shape[0], self.generator, trainer)
        loss = family.training_loss(self.model, batch, noise, t, trainer).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _since(start)

    def block(self, batch: dict[str, Any], steps: int, warmup: int = 0) -> list[tuple[float, float]]:
        for _ in range(warmup):
            self.step(batch)
        return [self.step(batch) for _ in range(steps)]


class StepClock:
    """Wraps the run's tracker: times stylekit's steps between metric rows, and runs bare steps in between."""

    def __init__(self, inner: Any, between: Any) -> None:
        self.inner, self.between = inner, between
        self.steps: dict[int, tuple[float, float]] = {}
        self.last: tuple[float, float] | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.inner.log(metrics, step)
        if "train/loss" not in metrics:
            return
        if self.last is not None:
            self.steps[step] = _since(self.last)
        self.between(step)
        self.last = _now()  # the bare step is not part of the next stylekit step

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def measure_step(family_name: str, resolution: int) -> dict[str, Any]:
    """stylekit's loop with a bare step after each of its steps, then the cache comparison, in this process."""

    total = WARMUP + PAIRS + 1
    with tempfile.TemporaryDirectory(prefix="stylekit-train-bench-") as tmp:
        session, samples = _session(family_name, resolution, Path(tmp), total)
        batch = session.examples[0].tensors
        state: dict[str, Any] = {"bare": [], "rss": None, "loop": None}

        def between(step: int) -> None:
            if step <= WARMUP:
                return
            if state["loop"] is None:
                state["rss"] = _peak_rss_mib()
                model = session.accelerator.unwrap_model(session.model)
                state["loop"] = BareLoop(session, model)
                state["loop"].block(batch, 0, warmup=WARMUP)
            state["bare"].append(state["loop"].step(batch))

        session.tracker = StepClock(session.tracker, between)
        session.train()
        timed = [seconds for step, seconds in session.tracker.steps.items() if step > WARMUP]
        (stylekit_s, stylekit_cpu), (bare_s, bare_cpu) = _medians(timed), _medians(state["bare"])
        result = {
            "stylekit_s": stylekit_s,
            "bare_s": bare_s,
            "stylekit_cpu_s": stylekit_cpu,
            "bare_cpu_s": bare_cpu,
            "stylekit_steps": len(timed),
            "bare_steps": len(state["bare"]),
            "stylekit_peak_rss_mib": state["rss"],
            "latent_shape": list(batch["latents"].shape),
        }
        result |= measure_cache(session, samples[0], state["loop"])
    return result


def measure_cache(session: Any, sample: Any, loop: BareLoop) -> dict[str, Any]:
    """Step on cached encodings vs encoding image + prompt every step (alternating, medians)."""
    import torch

    from stylekit.data.transforms import cache_key
    from stylekit.train.cache import short_hash

    family, encoders = session.family, session.encoders
    cached_batch = session.examples[0].tensors

    def encoded_step() -> tuple[float, float]:
        start = _now()
        with torch.no_grad():
            batch = {"latents": family.encode_image(encoders, sample.pixels()[None])}
            batch |= family.encode_prompt(encoders, sample.caption)
        batch |= {k: cached_batch[k] for k in ("original_size", "crop_top_left")}  # geometry, not encoding
        encoding = _since(start)
        training = loop.step(batch)
        return encoding[0] + training[0], encoding[1] + training[1]

    cached, encoded = [], []
    for _ in range(WARMUP):
        encoded_step()
    for _ in range(CACHE_PAIRS):
        cached.append(loop.step(cached_batch))
        encoded.append(encoded_step())

    model = session._model_id()
    loads = []
    for _ in range(20):
        start = time.perf_counter()
        session.cache.get_or_compute(cache_key(sample, model), _not_cached)
        session.cache.get_or_compute(f"text:{short_hash(model, sample.caption, '')}", _not_cached)
        loads.append(time.perf_counter() - start)
    return {
        "cached_s": _medians(cached)[0],
        "encoded_s": _medians(encoded)[0],
        "cache_load_ms": 1000 * statistics.median(loads),
    }


def _not_cached() -> dict[str, Any]:
    raise AssertionError("expected a cache hit")


def measure_bare(family_name: str, resolution: int) -> dict[str, Any]:
    """Peak RSS of the bare loop alone, after the same loading and encoding."""
    import torch

    from stylekit.train import lora_io

    with tempfile.TemporaryDirectory(prefix="stylekit-train-bench-") as tmp:
        session, _ = _session(family_name, resolution, Path(tmp), 1)
        model = session._denoiser()
        torch.manual_seed(session.seed)
        lora_io.attach_lora(model, session.cfg.lora, session.family)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        loop = BareLoop(session, model)
        steps = loop.block(session.examples[0].tensors, PAIRS, warmup=WARMUP)
    return {"bare_s": _medians(steps)[0], "bare_peak_rss_mib": _peak_rss_mib()}


def _child(mode: str, family_name: str, resolution: int) -> None:
    import torch

    logging.getLogger("stylekit").setLevel(logging.ERROR)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = (measure_step if mode == "step" else measure_bare)(family_name, resolution)
    print(json.dumps(result))


def _run_child(mode: str, family_name: str, resolution: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.train_bench", "--child", mode, family_name, str(resolution)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the table ----------------------------------------------------------------------------------------------


def main() -> list[dict[str, Any]]:
    rows = []
    for family_name, resolution in CASES:
        step = _run_child("step", family_name, resolution)
        bare = _run_child("bare", family_name, resolution)
        case = f"tiny {family_name} @{resolution} (latents {'x'.join(map(str, step['latent_shape'][1:]))})"
        rows.append(
            {
                "bench": "train",
                "case": f"{case}: stylekit step",
                "seconds": step["stylekit_s"],
                "baseline": "bare PyTorch loop",
                "baseline_seconds": step["bare_s"],
                "ratio": step["stylekit_s"] / step["bare_s"],
                "cpu_ratio": step["stylekit_cpu_s"] / step["bare_cpu_s"],
                "peak_rss_mib": step["stylekit_peak_rss_mib"],
                "baseline_peak_rss_mib": bare["bare_peak_rss_mib"],
                "steps": f"{step['stylekit_steps']}+{step['bare_steps']}",
            }
        )
        rows.append(
            {
                "bench": "train",
                "case": f"{case}: step on cached encodings",
                "seconds": step["cached_s"],
                "baseline": "encode image + prompt every step",
                "baseline_seconds": step["encoded_s"],
                "ratio": step["cached_s"] / step["encoded_s"],
                "cache_load_ms": step["cache_load_ms"],
            }
        )
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        from bench.__main__ import format_table

        print(format_table(main()))
