"""`scripts/train.py`'s task: train a LoRA and return the final validation loss (what sweepers optimize)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stylekit.errors import UsageError
from stylekit.train import loop
from stylekit.train.loop import Batches, Encoded, Timer

log = logging.getLogger("stylekit.train")

VALIDATION_SIGMAS = (0.25, 0.5, 0.75)


def run(cfg: DictConfig) -> float:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from stylekit.data.dataset import dataset_hash, prepare_class_samples, prepare_samples
    from stylekit.train.checkpoint import resolve_resume

    loop.check_trainer_config(cfg)
    resolve_resume(str(cfg.trainer.resume), loop.checkpoint_root(cfg))  # a mistyped path fails before loading
    try:
        family = instantiate(cfg.model)
    except InstantiationException as error:  # a bad model.* value: the family's own one-line message
        if isinstance(error.__cause__, UsageError):
            raise error.__cause__ from None
        raise
    # Every data problem surfaces here, before any model is loaded.
    samples = prepare_samples(cfg, multiple=family.resolution_multiple, seed=int(cfg.seed))
    samples = _with_controls(samples, family)
    train_samples, val_samples = _split_validation(samples, int(cfg.trainer.get("val_images", 1)))
    run_dir = Path(cfg.output_dir)
    _make_folders(cfg, run_dir)
    session = Session(cfg, family, run_dir)
    try:
        with session.tracker:
            session.prepare_models()
            class_samples = session.prior_preservation(prepare_class_samples)
            session.encode(train_samples, val_samples, class_samples)
            loss = session.train()
            session.finish(dataset_hash({s.record for s in samples}))
            return loss
    except Exception as error:
        if type(error).__name__ != "OutOfMemoryError":
            raise
        raise UsageError(
            f"CUDA ran out of memory training {family.family}: try model.quantize=nf4, "
            "trainer.gradient_checkpointing=true, optimizer.name=adamw8bit or a smaller data.resolution "
            "(checkpoints so far are kept; rerun to resume)"
        ) from error
    finally:
        loop.free_memory()


def _make_folders(cfg: DictConfig, run_dir: Path) -> None:
    """The run dir, checkpoint and cache folders, made before any model loads: one that cannot be made (a path
    under a file, a read-only mount) is the user's one line, not a traceback after minutes of loading."""
    folders = [("output_dir", cfg.output_dir, run_dir)]
    folders.append(("trainer.checkpoint_root", cfg.trainer.checkpoint_root, loop.checkpoint_root(cfg)))
    if cfg.trainer.cache_latents and cfg.trainer.get("cache_dir"):
        folders.append(("trainer.cache_dir", cfg.trainer.cache_dir, Path(cfg.trainer.cache_dir)))
    for key, value, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(
                f"{key}={value} cannot be created ({error.strerror or error}); choose another folder"
            ) from None


def _with_controls(samples: list, family: Any) -> list:
    if not family.needs_control:
        return samples
    paired = [s for s in samples if s.record.control_path is not None]
    if not paired:
        raise UsageError(
            f"{family.family} trains on pairs: put source images with the same file names in data.control_dir "
            "or name them with control_file_name in metadata.jsonl"
        )
    for sample in samples:
        if sample.record.control_path is None:
            log.warning("Skipping %s: no control image (data.control_dir)", sample.record.path)
    return paired


def _split_validation(samples: list, val_images: int) -> tuple[list, list]:
    """Hold out the last `val_images` images when there are enough to spare; else validate on training ones."""
    images = sorted({str(s.record.path) for s in samples})
    if val_images < 1 or len(images) < max(8, 4 * val_images):
        return samples, samples[: max(1, min(4, len(samples)))]
    held = set(images[-val_images:])
    return [s for s in samples if str(s.record.path) not in held], [
        s for s in samples if str(s.record.path) in held
    ]


class Session:
    """State of one training run; methods are the stages in order."""

    def __init__(self, cfg: DictConfig, family: Any, run_dir: Path) -> None:
        from stylekit.tracking import make_tracker

        self.cfg, self.family = cfg, family
        self.trainer = cfg.trainer
        self.seed = int(cfg.seed)
        # The Accelerator comes first: under `accelerate launch` it pins each rank to its own GPU, and every
        # model must load onto that device, not onto cuda:0.
        self.accelerator = _accelerator(str(self.trainer.mixed_precision))
        self.run_dir = _shared_run_dir(self.accelerator, run_dir)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if self.accelerator.is_main_process:
            self.tracker = make_tracker(cfg.logger, self.run_dir, resolved)
        else:  # one W&B run per job, not per GPU; other ranks keep their metrics beside it
            rank = self.accelerator.process_index
            self.tracker = make_tracker({"backend": "none"}, self.run_dir / "ranks" / str(rank), resolved)
        self.checkpoint_root = loop.checkpoint_root(cfg)
        self.denoiser = None
        self.class_examples: list[Encoded] = []

    # ---- models -----------------------------------------------------------------------------------------
    def prepare_models(self) -> None:
        self.runtime = self.family.runtime(str(self.accelerator.device))
        self.family.quantization_config(self.runtime)  # CUDA-only settings fail before any weights load
        self.encoders = self.family.load_encoders(self.runtime)

    def _denoiser(self) -> Any:
        if self.denoiser is None:
            self.denoiser = self.family.load_denoiser(self.runtime)
        return self.denoiser

    def prior_preservation(self, prepare_class_samples: Any) -> list:
        from stylekit.data.dataset import count_missing_class_images

        data = self.cfg.data
        if not data.get("class_dir") or int(data.get("num_class_images") or 0) < 1:
            return []
        missing = count_missing_class_images(data.class_dir, int(data.num_class_images))
        if missing:
            self._generate_class_images(Path(data.class_dir), str(data.class_prompt), missing)
        return prepare_class_samples(self.cfg, multiple=self.family.resolution_multiple, seed=self.seed)

    def _generate_class_images(self, class_dir: Path, prompt: str, count: int) -> None:
        import torch

        from stylekit.io import atomic_write_bytes

        log.info("Generating %d class images for prior preservation in %s", count, class_dir)
        class_dir.mkdir(parents=True, exist_ok=True)
        pipe = self.family.pipeline_with(self._denoiser(), self.encoders)
        size = (int(self.cfg.data.resolution),) * 2
        existing = len(list(class_dir.glob("class_*.png")))
        for i in range(count):
            generator = torch.Generator(self.runtime.device).manual_seed(self.seed + existing + i)
            image = self.family.sample(pipe, prompt, size, self._sample_steps(), generator)
            atomic_write_bytes(class_dir / f"class_{existing + i:05d}.png", _png_bytes(image))

    # ---- encoding ---------------------------------------------------------------------------------------
    def encode(self, train_samples: list, val_samples: list, class_samples: list) -> None:
        from stylekit.train.cache import TensorCache, default_cache_dir

        root = Path(self.trainer.get("cache_dir") or default_cache_dir())
        self.cache = TensorCache(root, enabled=bool(self.trainer.cache_latents))
        timer = Timer()
        self.examples = [self._encode(s) for s in train_samples]
        self.val_examples = [self._encode(s) for s in val_samples]
        self.class_examples = [self._encode(s) for s in class_samples]
        self.val_control = val_samples[0].control_pixels() if self.family.needs_control else None
        self.first_caption = train_samples[0].caption
        self.sample_size = train_samples[0].size
        log.info(
            "Encoded %d examples in %.1fs: cache %s (%s)",
            len(self.examples) + len(self.val_examples) + len(self.class_examples),
            timer(),
            self.cache.stats,
            root,
        )
        # Encoders leave the accelerator for training; validation brings them back briefly.
        self.encoders.to("cpu")
        loop.free_memory()

    def _model_id(self) -> str:
        """Everything about the family that can change an encoding (sequence length, condition areas...)."""
        import dataclasses

        settings = {k: v for k, v in dataclasses.asdict(self.family).items() if k != "inference"}
        return f"{self.family.family}:{self.family.source('train')}:{json.dumps(settings, sort_keys=True)}"

    def _encode(self, sample: Any) -> Encoded:
        import torch

        from stylekit.data.transforms import cache_key
        from stylekit.train.cache import short_hash

        model = self._model_id()
        control_pixels = sample.control_pixels() if self.family.needs_control else None

        def images() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                out = {"latents": self.family.encode_image(self.encoders, sample.pixels()[None])}
                if control_pixels is not None:
                    out["control_latents"] = self.family.encode_image(self.encoders, control_pixels[None])
            return out

        def text() -> dict[str, torch.Tensor]:
            control = _to_pil(control_pixels) if control_pixels is not None else None
            with torch.no_grad():
                return self.family.encode_prompt(self.encoders, sample.caption, control)

        text_key = short_hash(
            model, sample.caption, cache_key(sample, model) if control_pixels is not None else ""
        )
        tensors = {**self.cache.get_or_compute(cache_key(sample, model), images)}
        tensors |= self.cache.get_or_compute(f"text:{text_key}", text)
        return Encoded(sample.size, tensors, sample.is_prior)

    # ---- training ---------------------------------------------------------------------------------------
    def train(self) -> float:
        import torch
        from tqdm.auto import tqdm

        from stylekit.train import lora_io
        from stylekit.train.checkpoint import CheckpointManager, GracefulExit, resolve_resume
        from stylekit.train.optim import make_optimizer, make_schedule

        trainer = self.trainer
        denoiser = self._denoiser()
        if trainer.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        torch.manual_seed(self.seed)  # the LoRA's initial weights are part of what `seed` reproduces
        self.lora_config = lora_io.attach_lora(denoiser, self.cfg.lora, self.family)
        params = [p for p in denoiser.parameters() if p.requires_grad]
        for p in params:  # train LoRA weights in fp32 even when the base model is bf16
            p.data = p.data.float()
        optimizer = make_optimizer(params, self.cfg.optimizer)
        schedule = make_schedule(optimizer, trainer)
        accelerator = self.accelerator
        # The schedule stays unwrapped: accelerate's wrapper would step it once per process on every step.
        model, optimizer = accelerator.prepare(denoiser, optimizer)
        # One process and no fp16 loss scaling: accelerate's wrappers add only per-step bookkeeping (an importlib
        # search, signature inspection, a DTensor scan of every parameter), so step the plain optimizer.
        single = accelerator.num_processes == 1 and accelerator.scaler is None
        stepper = optimizer.optimizer if single else optimizer
        clip = torch.nn.utils.clip_grad_norm_ if single else accelerator.clip_grad_norm_
        self.model = model
        manager = CheckpointManager(self.checkpoint_root, int(trainer.keep_checkpoints))
        start = self._resume(resolve_resume(str(trainer.resume), self.checkpoint_root), optimizer, schedule)
        batches = Batches(self.examples, int(trainer.batch_size), self.seed)
        prior = (
            Batches(self.class_examples, int(trainer.batch_size), self.seed + 1)
            if self.class_examples
            else None
        )
        max_steps, accumulation = int(trainer.max_steps), int(trainer.gradient_accumulation_steps)
        world, rank = accelerator.num_processes, accelerator.process_index
        log.info("Training %s LoRA r=%s for %d steps (from %d); checkpoints in %s", self.family.family,
                 self.cfg.lora.rank, max_steps, start, self.checkpoint_root)  # fmt: skip
        bar = tqdm(total=max_steps, initial=start, desc="train", disable=not accelerator.is_main_process)
        val_loss = float("nan")
        with GracefulExit() as stop:
            for step in range(start, max_steps):
                timer = Timer()
                total = 0.0
                for k in range(accumulation):
                    micro = (step * accumulation + k) * world + rank
                    loss = self._micro_loss(batches, prior, micro) / accumulation
                    accelerator.backward(loss)
                    total += float(loss.detach())
                if trainer.max_grad_norm:
                    clip(params, float(trainer.max_grad_norm))
                stepper.step()
                schedule.step()
                stepper.zero_grad(set_to_none=True)
                done = step + 1
                lr = schedule.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", refresh=False)  # update() redraws
                self.tracker.log(
                    {"train/loss": total, "train/lr": lr, "train/step_seconds": timer()}, step=done
                )
                last = done == max_steps
                if done % int(trainer.checkpoint_every) == 0 or last or stop.stop_requested:
                    self._save_checkpoint(manager, done, optimizer, schedule)
                if stop.stop_requested and not last:
                    bar.close()
                    log.warning("Stopped at step %d by %s; rerun the same command to resume.", done,
                                stop.signal_name)  # fmt: skip
                    sys.exit(143 if stop.signal_name == "SIGTERM" else 130)
                if done % int(trainer.validate_every) == 0 or last:
                    val_loss = self.validate(done, samples=not last)
        bar.close()
        if start >= max_steps:  # resumed a finished run: no step ran, but the result still needs its loss
            val_loss = self.validate(start, samples=False)
        self.final_val_loss = val_loss
        self.steps_done = max(start, max_steps)  # what the weights saw (a rerun may ask for fewer steps)
        return val_loss

    def _micro_loss(self, batches: Batches, prior: Batches | None, micro: int) -> Any:
        import torch

        # LoRA dropout draws from the global generators. Not torch.manual_seed: with CUDA not initialised (CPU
        # runs) it formats a stack trace on every call, ~1 ms a step.
        seed = loop.micro_generator(self.seed, micro).initial_seed()
        torch.random.default_generator.manual_seed(seed)
        if self.runtime.is_cuda:
            torch.cuda.manual_seed(seed)
        loss = self._batch_loss(batches.get(micro), loop.micro_generator(self.seed, micro)).mean()
        if prior is not None:
            prior_loss = self._batch_loss(prior.get(micro), loop.micro_generator(self.seed + 7, micro)).mean()
            loss = loss + float(self.trainer.prior_loss_weight) * prior_loss
        return loss

    def _batch_loss(self, batch: dict, generator: Any, t: Any = None) -> Any:
        import torch

        device = self.runtime.device
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=generator)
        if float(self.trainer.noise_offset):
            offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator)
            noise = noise + float(self.trainer.noise_offset) * offset
        if t is None:
            t = self.family.sample_timesteps(latents.shape[0], generator, self.trainer)
        batch = {k: v.to(device) for k, v in batch.items()}
        with self.accelerator.autocast():
            return self.family.training_loss(self.model, batch, noise.to(device), t.to(device), self.trainer)

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _save_checkpoint(self, manager: Any, step: int, optimizer: Any, schedule: Any) -> None:
        import torch
        from safetensors.torch import save_file

        from stylekit.train import lora_io

        if not self.accelerator.is_main_process:
            return

        def write(folder: Path) -> None:
            save_file(
                lora_io.lora_state_dict(self.accelerator.unwrap_model(self.model)),
                str(folder / "lora.safetensors"),
            )
            torch.save(
                {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, folder / "optim.pt"
            )
            (folder / "state.json").write_text(
                json.dumps({"step": step, "identity": loop.identity_hash(self.cfg)})
            )

        try:
            manager.save(step, write)
        except OSError as error:  # a full disk: earlier checkpoints are intact (CheckpointManager.save)
            raise UsageError(
                f"could not save the step {step} checkpoint in {manager.root} ({error.strerror or error}); "
                "free space there or set trainer.checkpoint_root, then rerun to resume from the last one"
            ) from error

    def _resume(self, checkpoint: Path | None, optimizer: Any, schedule: Any) -> int:
        import torch
        from safetensors.torch import load_file

        from stylekit.train import lora_io

        if checkpoint is None:
            return 0
        state = json.loads((checkpoint / "state.json").read_text())
        lora_io.load_lora_state_dict(
            self.accelerator.unwrap_model(self.model), load_file(str(checkpoint / "lora.safetensors"))
        )
        saved = torch.load(checkpoint / "optim.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        log.info("Resumed from %s (step %d)", checkpoint, state["step"])
        return int(state["step"])

    # ---- validation -------------------------------------------------------------------------------------
    def validation_loss(self) -> float:
        """Mean loss over the validation examples at fixed noise levels and fixed noise: comparable across
        steps, runs and sweep jobs."""
        import torch

        losses = []
        with torch.no_grad():
            for i, example in enumerate(self.val_examples):
                batch = loop.collate([example.tensors])
                for j, sigma in enumerate(VALIDATION_SIGMAS):
                    generator = torch.Generator().manual_seed(10_000 + 97 * i + j)
                    t = torch.full((1,), sigma)
                    losses.append(float(self._batch_loss(batch, generator, t).mean()))
        return sum(losses) / len(losses)

    def validate(self, step: int, samples: bool = True) -> float:
        # LoRA dropout off while validating, then each module back in the mode it had.
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            return self._validate(step, samples)
        finally:
            for module, training in modes.items():
                module.training = training

    def _validate(self, step: int, samples: bool) -> float:
        val_loss = self.validation_loss()
        log.info("step %d: validation loss %.5f", step, val_loss)
        self.tracker.log({"val/loss": val_loss}, step=step)
        if samples and self.accelerator.is_main_process:
            pipe = self.family.pipeline_with(self.accelerator.unwrap_model(self.model), self.encoders)
            # The prepared model returns fp32 under mixed precision (accelerate's wrapper), and the pipeline
            # hands those latents to a bf16 VAE; under the same autocast the VAE takes them.
            with self.accelerator.autocast():
                self._sample_grid(pipe, step)
        return val_loss

    def _sample_steps(self) -> int:
        configured = self.trainer.get("validation_steps")
        return int(configured or min(28, int(self.family.inference_defaults()["num_inference_steps"])))

    def _prompts(self) -> list[str]:
        return [str(p) for p in self.trainer.validation_prompts] or [self.first_caption or "a photo"]

    def _sample_grid(self, pipe: Any, step: int) -> Path:
        import torch

        from stylekit.io import atomic_write_bytes

        self.encoders.to(self.runtime.device)
        control = _to_pil(self.val_control) if self.val_control is not None else None
        images = []
        with torch.no_grad():
            for i, prompt in enumerate(self._prompts()):
                generator = torch.Generator(self.runtime.device).manual_seed(self.seed + i)
                images.append(
                    self.family.sample(
                        pipe, prompt, self.sample_size, self._sample_steps(), generator, control
                    )
                )
        self.encoders.to("cpu")
        grid = _grid(images)
        path = self.run_dir / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, _png_bytes(grid))
        self.tracker.log_images("samples", images, step=step, captions=self._prompts())
        return path

    # ---- the result -------------------------------------------------------------------------------------
    def finish(self, data_hash: str) -> None:
        """Save the LoRA, prove it loads into a fresh pipeline, and sample with that pipeline."""
        from stylekit.train import lora_io

        if not self.accelerator.is_main_process:
            return
        cfg = self.cfg
        metadata = {
            **self.family.describe(),
            "rank": int(cfg.lora.rank),
            "alpha": float(cfg.lora.alpha),
            "trigger": str(cfg.data.get("trigger") or ""),
            "steps": self.steps_done,
            "dataset_hash": data_hash,
            "validation_loss": self.final_val_loss,
            "seed": self.seed,
        }
        lora_dir = self.run_dir / "lora"
        comfy = str(self.trainer.lora_format) == "comfyui"
        weights = lora_io.save_lora(self.family, self.accelerator.unwrap_model(self.model), self.lora_config,
                                    lora_dir, metadata, comfyui=comfy)  # fmt: skip
        # The check users care about: the file applies to an untouched base model.
        self.model = self.denoiser = None
        self.accelerator.free_memory()  # it holds the trained model and optimizer too
        loop.free_memory()
        fresh = self.family.pipeline_with(self.family.load_denoiser(self.runtime), self.encoders)
        lora_io.verify_loads(fresh, lora_dir)
        grid = self._sample_grid(fresh, self.steps_done)
        # The tracker owns summary.json (and W&B's run summary): writing it here too lost one or the other.
        self.tracker.summary(
            {"lora": str(weights), "samples": str(grid), **metadata, "val/final_loss": self.final_val_loss}
        )
        self.tracker.log_artifact(lora_dir, name=f"lora-{self.family.family}", type="lora")
        log.info("LoRA saved to %s (loads into a fresh %s pipeline)", weights, self.family.family)


def _to_pil(pixels: Any) -> Any:
    from PIL import Image

    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def _grid(images: list) -> Any:
    from PIL import Image

    width, height = images[0].size
    grid = Image.new("RGB", (width * len(images), height))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((width, height)), (i * width, 0))
    return grid


def _png_bytes(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _accelerator(mixed_precision: str) -> Any:
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    # auto: bf16 autocast on CUDA, none on CPU; an explicit bf16/fp16 is honoured on CPU too (the precision tier
    # of the tests runs what a CUDA run runs).
    precision = mixed_precision if mixed_precision != "auto" else ("bf16" if cuda else "no")
    earlier = AcceleratorState._shared_state.get("_mixed_precision")
    if earlier is not None and earlier != precision:
        # An earlier run in this process (a sweep job, a reused Modal container) fixed another precision, which
        # accelerate refuses to change; the process group (PartialState) stays.
        AcceleratorState._reset_state()
    # Some LoRA targets get no gradient (Qwen's last block discards its text stream); DDP must not wait for them.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(mixed_precision=precision, cpu=not cuda, kwargs_handlers=[ddp])


def _shared_run_dir(accelerator: Any, run_dir: Path) -> Path:
    """Every rank writes where rank 0 does (each resolved its own ${now:...})."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
