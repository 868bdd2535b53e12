"""`scripts/train.py`'s task: train a LoRA and return the final validation loss (what sweepers optimize)."""

from __future__ import annotations

import contextlib
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

    from stylekit import schema
    from stylekit.data.dataset import dataset_hash, prepare_class_samples, prepare_samples
    from stylekit.train.checkpoint import check_resume

    schema.validate("train", cfg)  # every bad key and value, one line each, before anything heavy
    check_resume(str(cfg.trainer.resume))  # a mistyped path fails before loading
    try:
        family = instantiate(cfg.model)
    except InstantiationException as error:  # a bad model.* value: the family's own one-line message
        if isinstance(error.__cause__, UsageError):
            raise error.__cause__ from None
        raise
    # Every data problem surfaces here, before any model is loaded.
    samples = prepare_samples(cfg, multiple=family.bucket_multiple, seed=int(cfg.seed))
    family.check_runnable("train")  # no GPU for a real model, or weights out of reach: one line, no download
    samples = _with_controls(samples, family, from_dataset=bool(cfg.data.get("hf_dataset")))
    train_samples, val_samples = _split_validation(samples, int(cfg.trainer.get("val_images", 1)))
    val_samples = _validation_views(val_samples, samples, cfg.data, family.bucket_multiple)
    run_dir = Path(cfg.output_dir)
    _make_folders(cfg, run_dir)
    session = Session(cfg, family, run_dir)
    try:
        with session.tracker:
            session.prepare_models()
            class_samples = session.prior_preservation(prepare_class_samples)
            # Resume identity covers the data, class images included (known only once they are generated).
            session.identify(dataset_hash({s.record for s in [*samples, *class_samples]}))
            session.encode(train_samples, val_samples, class_samples)
            loss = session.train()
            _check_finite(loss, cfg)
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
    folders.append(("trainer.checkpoint_root", cfg.trainer.checkpoint_root, loop.checkpoints_dir(cfg)))
    if cfg.trainer.cache_latents and cfg.trainer.get("cache_dir"):
        folders.append(("trainer.cache_dir", cfg.trainer.cache_dir, Path(cfg.trainer.cache_dir)))
    for key, value, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(
                f"{key}={value} cannot be created ({error.strerror or error}); choose another folder"
            ) from None


def _with_controls(samples: list, family: Any, from_dataset: bool = False) -> list:
    if not family.needs_control:
        return samples
    paired = [s for s in samples if s.record.control_path is not None]
    if not paired:
        if from_dataset:
            raise UsageError(
                f"{family.family} trains on pairs: name the column of data.hf_dataset holding each row's source "
                "image with data.control_column"
            )
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
        if val_images >= 1:
            log.warning(
                "No held-out validation images (trainer.val_images=%d needs %d or more images, found %d): the "
                "validation loss is measured on training images and rewards overfitting",
                val_images, max(8, 4 * val_images), len(images),
            )  # fmt: skip
        return samples, samples[: max(1, min(4, len(samples)))]
    held = set(images[-val_images:])
    return [s for s in samples if str(s.record.path) not in held], [
        s for s in samples if str(s.record.path) in held
    ]


def _validation_views(val_samples: list, samples: list, data_cfg: Any, multiple: int) -> list:
    """The validation images as the same views in every run: centre crop, no flip, full caption, one repeat.

    Training samples draw crops, flips and caption dropout from `seed`; validation must not, or trials of a
    sweep would score different pictures. A view that equals a training sample is that sample (encoded once).
    """
    from dataclasses import replace

    from stylekit.data import transforms

    opts = replace(transforms.DataOptions.from_cfg(data_cfg), crop="center", random_flip=0.0, caption_dropout=0.0,
                   repeats=1)  # fmt: skip
    records = list({id(s.record): s.record for s in val_samples}.values())
    views = transforms.build_samples(records, opts, multiple, rng=0)[: len(val_samples)]
    existing = {sample: sample for sample in samples}
    return [existing.get(view, view) for view in views]


def _check_finite(loss: float, cfg: DictConfig) -> None:
    """A NaN or infinite validation loss is a failed run: a sweeper cannot rank it, and its LoRA is broken."""
    import math

    if not math.isfinite(loss):
        raise UsageError(
            f"training diverged: the validation loss is {loss} (optimizer.lr={cfg.optimizer.get('lr')}, "
            f"lora.rank={cfg.lora.rank}); lower optimizer.lr"
        )


class Session:
    """State of one training run; methods are the stages in order."""

    def __init__(self, cfg: DictConfig, family: Any, run_dir: Path) -> None:
        from stylekit.tracking import make_tracker

        self.cfg, self.family = cfg, family
        self.trainer = cfg.trainer
        self.seed = int(cfg.seed)
        # The Accelerator comes first: under `accelerate launch` it pins each rank to its own GPU, and every
        # model must load onto that device, not onto cuda:0.
        self.accelerator = _accelerator(
            str(self.trainer.mixed_precision), family.ddp_find_unused_parameters, cpu=family.device == "cpu"
        )
        self.run_dir = _shared_run_dir(self.accelerator, run_dir)
        # Every rank prints to the same terminal: rank 0 speaks for all, the others only warn.
        if not self.accelerator.is_main_process:
            logging.getLogger("stylekit").setLevel(logging.WARNING)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if self.accelerator.is_main_process:
            self.tracker = make_tracker(cfg.logger, self.run_dir, resolved)
        else:  # one W&B run per job, not per GPU; other ranks keep their metrics beside it
            rank = self.accelerator.process_index
            self.tracker = make_tracker({"backend": "none"}, self.run_dir / "ranks" / str(rank), resolved)
        self.checkpoint_root: Path | None = None  # set by identify(), once the data is known
        self.data_hash = ""
        self.denoiser = None
        self.class_examples: list[Encoded] = []

    def identify(self, data_hash: str) -> None:
        """Key this run's checkpoints on the config and on `data_hash`, the hash of everything it trains on."""
        self.data_hash = data_hash
        self.checkpoint_root = loop.checkpoint_root(self.cfg, data_hash)

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
        class_dir = Path(data.class_dir)
        missing = count_missing_class_images(class_dir, int(data.num_class_images))
        existing = len(list(class_dir.glob("class_*.png"))) if missing else 0
        # Every rank has counted before any rank writes, so all agree on which images are missing.
        self.accelerator.wait_for_everyone()
        if missing:
            self._generate_class_images(class_dir, str(data.class_prompt), existing, missing)
            self.accelerator.wait_for_everyone()  # all of them on disk before any rank reads the folder
        return prepare_class_samples(self.cfg, multiple=self.family.bucket_multiple, seed=self.seed)

    def _generate_class_images(self, class_dir: Path, prompt: str, first: int, count: int) -> None:
        """Images `first` .. `first + count - 1`, each seeded by its index; under several processes each rank
        draws every world-th one, so the folder is the same as one process would write, in 1/world the time."""
        import torch

        from stylekit.io import atomic_write_bytes

        log.info("Generating %d class images for prior preservation in %s", count, class_dir)
        class_dir.mkdir(parents=True, exist_ok=True)
        pipe = self.family.pipeline_with(self._denoiser(), self.encoders)
        size = (int(self.cfg.data.resolution),) * 2
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        for i in range(first + rank, first + count, world):
            generator = torch.Generator(self.runtime.device).manual_seed(self.seed + i)
            image = self.family.sample(pipe, prompt, size, self._sample_steps(), generator)
            atomic_write_bytes(class_dir / f"class_{i:05d}.png", _png_bytes(image))

    # ---- encoding ---------------------------------------------------------------------------------------
    def encode(self, train_samples: list, val_samples: list, class_samples: list) -> None:
        from stylekit.train.cache import TensorCache, default_cache_dir

        root = Path(self.trainer.get("cache_dir") or default_cache_dir())
        self.cache = TensorCache(root, enabled=bool(self.trainer.cache_latents))
        timer = Timer()
        self._encode_shares([*train_samples, *val_samples, *class_samples])
        self.examples = [self._encode(s) for s in train_samples]
        self.val_examples = [self._encode(s) for s in val_samples]
        self.class_examples = [self._encode(s) for s in class_samples]
        # The control image validation samples edit (edit families), as the pipeline takes it.
        self.val_control = _to_pil(val_samples[0].control_pixels()) if self.family.needs_control else None
        self.first_caption = train_samples[0].caption
        self.sample_size = train_samples[0].size
        # Only the main process samples (validation grids, the final check).
        self.sampling_inputs = self._encode_sampling_prompts() if self.accelerator.is_main_process else []
        log.info(
            "Encoded %d examples in %.1fs: cache %s (%s)",
            len(self.examples) + len(self.val_examples) + len(self.class_examples),
            timer(),
            self.cache.stats,
            root,
        )
        # Encoders leave the accelerator for training; sampling brings back only the VAE (the prompts are
        # encoded above), so a card that fits training fits its validation too.
        self.encoders.to("cpu")
        loop.free_memory()

    def _encode_sampling_prompts(self) -> list[dict[str, Any]]:
        """The validation prompts' tensors (with their negatives), kept on the CPU until sampling."""
        import torch

        with torch.inference_mode():
            encoded = [
                self.family.sampling_inputs(self.encoders, p, self.val_control) for p in self._prompts()
            ]
        return [{k: v.to("cpu") if hasattr(v, "to") else v for k, v in e.items()} for e in encoded]

    def _encode_shares(self, samples: list) -> None:
        """Under several processes each rank first encodes every world-th sample into the shared cache, then
        waits for the others: the dataset is encoded once, split across the GPUs, and every rank then reads all
        of it back from the cache. Without a cache (trainer.cache_latents=false) each rank encodes everything."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1 or not self.cache.enabled:
            return
        unique = list({id(sample): sample for sample in samples}.values())  # val samples may be train ones
        for sample in unique[accelerator.process_index :: accelerator.num_processes]:
            self._encode(sample)
        accelerator.wait_for_everyone()

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
        # The control at the size the pipeline conditions on at inference (Qwen: its ~1 MP condition area).
        control_size = self.family.control_size(sample.size)
        control_pixels = sample.control_pixels(control_size) if self.family.needs_control else None

        def images() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                out = {"latents": self.family.encode_image(self.encoders, sample.pixels()[None])}
                if control_pixels is not None:
                    out["control_latents"] = self.family.encode_image(self.encoders, control_pixels[None])
            # SDXL's size and crop conditioning: (h, w) of the whole photo, (top, left) of the crop.
            out["original_size"] = torch.tensor([sample.original_size[::-1]])
            out["crop_top_left"] = torch.tensor([sample.crop_top_left()])
            return out

        def text() -> dict[str, torch.Tensor]:
            control = _to_pil(control_pixels) if control_pixels is not None else None
            with torch.no_grad():
                return self.family.encode_prompt(self.encoders, sample.caption, control)

        image_key = cache_key(sample, model, control_size=control_size)
        text_key = short_hash(model, sample.caption, image_key if control_pixels is not None else "")
        tensors = {**self.cache.get_or_compute(image_key, images)}
        tensors |= self.cache.get_or_compute(f"text:{text_key}", text)
        return Encoded(sample.size, tensors, sample.is_prior)

    # ---- training ---------------------------------------------------------------------------------------
    def train(self) -> float:
        import torch
        from tqdm.auto import tqdm

        from stylekit.train import lora_io
        from stylekit.train.checkpoint import CheckpointManager, GracefulExit
        from stylekit.train.optim import make_optimizer, make_schedule

        trainer = self.trainer
        if self.checkpoint_root is None:
            raise RuntimeError(
                "Session.identify(data_hash) must run before train(): checkpoints are keyed on it"
            )
        denoiser = self._denoiser()
        if loop.gradient_checkpointing(trainer, self.family):
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
        # accelerate wraps the forward in autocast plus an fp32 cast of its outputs. Training autocasts itself
        # (`_batch_loss`), and sampling must get the denoiser's own output dtype: fp32 latents from the wrapper
        # reach a bf16 VAE and fail ("Input type (float) and bias type (c10::BFloat16) should be the same").
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        # One process and no fp16 loss scaling: accelerate's wrappers add only per-step bookkeeping (an importlib
        # search, signature inspection, a DTensor scan of every parameter), so step the plain optimizer.
        single = accelerator.num_processes == 1 and accelerator.scaler is None
        stepper = optimizer.optimizer if single else optimizer
        clip = torch.nn.utils.clip_grad_norm_ if single else accelerator.clip_grad_norm_
        self.model = model
        # Only rank 0 writes checkpoints, and only it tidies up what an interrupted save left.
        main = accelerator.is_main_process
        manager = CheckpointManager(self.checkpoint_root, int(trainer.keep_checkpoints)) if main else None
        start = self._resume(self._checkpoint_to_resume(), optimizer, schedule)
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
                    # Under DDP gradients are all-reduced once per optimizer step, on its last micro-batch; the
                    # others only accumulate locally (no_sync must cover the forward pass too).
                    last_micro = k == accumulation - 1
                    with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                        loss = self._micro_loss(batches, prior, micro) / accumulation
                        accelerator.backward(loss)
                    total += float(loss.detach())
                if trainer.max_grad_norm:
                    clip(params, float(trainer.max_grad_norm))
                stepper.step()
                schedule.step()
                stepper.zero_grad(set_to_none=True)
                total, stopping = self._across_ranks(total, stop.stop_requested)
                done = step + 1
                lr = schedule.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", refresh=False)  # update() redraws
                self.tracker.log(
                    {"train/loss": total, "train/lr": lr, "train/step_seconds": timer()}, step=done
                )
                last = done == max_steps
                if done % int(trainer.checkpoint_every) == 0 or last or stopping:
                    self._save_checkpoint(manager, done, optimizer, schedule)
                if stopping and not last:
                    bar.close()
                    # No rank exits before rank 0's checkpoint is whole: a launcher kills the rest of the job
                    # as soon as one of its processes ends.
                    accelerator.wait_for_everyone()
                    by = stop.signal_name or "a signal to another process of this run"
                    log.warning("Stopped at step %d by %s; rerun the same command to resume.", done, by)
                    sys.exit(130 if stop.signal_name == "SIGINT" else 143)
                if done % int(trainer.validate_every) == 0 or last:
                    val_loss = self.validate(done, samples=not last)
        bar.close()
        if start >= max_steps:  # resumed a finished run: no step ran, but the result still needs its loss
            val_loss = self.validate(start, samples=False)
        self.final_val_loss = val_loss
        self.steps_done = max(start, max_steps)  # what the weights saw (a rerun may ask for fewer steps)
        return val_loss

    def _across_ranks(self, loss: float, stop: bool) -> tuple[float, bool]:
        """The step's loss averaged over the ranks (each saw its own micro-batches), and whether any rank was
        asked to stop. Signals reach the processes at different moments; all must stop at the same step, or the
        ones still training wait forever for the others in the next all-reduce."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return loss, stop
        import torch

        values = torch.tensor([loss, float(stop)], dtype=torch.float64, device=accelerator.device)
        summed = accelerator.reduce(values, reduction="sum")
        return float(summed[0]) / accelerator.num_processes, bool(summed[1] > 0)

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
            state = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
            if self.accelerator.scaler is not None:  # fp16 on CUDA: the loss scale is part of the state
                state["scaler"] = self.accelerator.scaler.state_dict()
            torch.save(state, folder / "optim.pt")
            (folder / "state.json").write_text(
                json.dumps(
                    {
                        "step": step,
                        "identity": loop.identity_hash(self.cfg, self.data_hash),
                        "dataset_hash": self.data_hash,
                    }
                )
            )

        try:
            manager.save(step, write)
        except OSError as error:  # a full disk: earlier checkpoints are intact (CheckpointManager.save)
            raise UsageError(
                f"could not save the step {step} checkpoint in {manager.root} ({error.strerror or error}); "
                "free space there or set trainer.checkpoint_root, then rerun to resume from the last one"
            ) from error

    def _checkpoint_to_resume(self) -> Path | None:
        """Rank 0's choice for every rank: all must start from the same step, and rank 0's CheckpointManager may
        just have restored a checkpoint that an interrupted save had moved aside."""
        from stylekit.train.checkpoint import resolve_resume

        found = resolve_resume(str(self.trainer.resume), self.checkpoint_root)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            found = broadcast_object_list([found])[0]
        return found

    def _resume(self, checkpoint: Path | None, optimizer: Any, schedule: Any) -> int:
        import torch
        from safetensors.torch import load_file

        from stylekit.train import lora_io
        from stylekit.train.checkpoint import finished_lora

        if checkpoint is None:
            return 0
        state = json.loads((checkpoint / "state.json").read_text())
        lora_io.load_lora_state_dict(
            self.accelerator.unwrap_model(self.model), load_file(str(checkpoint / "lora.safetensors"))
        )
        saved = torch.load(checkpoint / "optim.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        if "scaler" in saved and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        log.info("Resumed from %s (step %d)", checkpoint, state["step"])
        trained_on = state.get("dataset_hash", self.data_hash)
        if trained_on != self.data_hash:  # only an explicit trainer.resume=PATH can point at other data
            log.warning("%s was trained on other data (dataset hash %s, now %s); continuing from its weights as "
                        "trainer.resume asks", checkpoint, trained_on, self.data_hash)  # fmt: skip
        elif int(state["step"]) >= int(self.trainer.max_steps):
            earlier = finished_lora(self.checkpoint_root)
            where = f"its LoRA is {earlier}" if earlier else "its LoRA file is gone"
            log.info("This run already finished at step %d on the same data; %s (saving it again to %s)",
                     state["step"], where, self.run_dir / "lora")  # fmt: skip
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
            denoiser = self.accelerator.unwrap_model(self.model)
            self._sample_grid(self.family.pipeline_with(denoiser, self.encoders, text_encoders=False), step)
        return val_loss

    def _sample_steps(self) -> int:
        configured = self.trainer.get("validation_steps")
        return int(configured or min(28, int(self.family.inference_defaults()["num_inference_steps"])))

    def _prompts(self) -> list[str]:
        return [str(p) for p in self.trainer.validation_prompts] or [self.first_caption or "a photo"]

    def _sample_grid(self, pipe: Any, step: int) -> Path:
        import torch

        from stylekit.io import atomic_write_bytes

        pipe.vae.to(self.runtime.device)
        pipe.set_progress_bar_config(disable=True)  # the training bar already says where the run is
        images = []
        # Autocast as in training: what the samples show is what the training steps computed.
        with torch.inference_mode(), self.accelerator.autocast():
            for i, inputs in enumerate(self.sampling_inputs):
                generator = torch.Generator(self.runtime.device).manual_seed(self.seed + i)
                images.append(
                    self.family.sample(
                        pipe, inputs, self.sample_size, self._sample_steps(), generator, self.val_control
                    )
                )
        pipe.vae.to("cpu")
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
        from stylekit.train.checkpoint import record_finished

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
        record_finished(self.checkpoint_root, self.steps_done, weights)
        # The check users care about: the file applies to an untouched base model.
        self.model = self.denoiser = None
        self.accelerator.free_memory()  # it holds the trained model and optimizer too
        loop.free_memory()
        fresh = self.family.pipeline_with(
            self.family.load_denoiser(self.runtime), self.encoders, text_encoders=False
        )
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


def _accelerator(mixed_precision: str, find_unused_parameters: bool = False, cpu: bool = False) -> Any:
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available() and not cpu
    # auto: bf16 autocast on CUDA, none on CPU; an explicit bf16/fp16 is honoured on CPU too (the precision tier
    # of the tests runs what a CUDA run runs).
    precision = mixed_precision if mixed_precision != "auto" else ("bf16" if cuda else "no")
    # One process may train several runs in turn (a sweep under Hydra's basic launcher, tests): accelerate keeps
    # the precision process-wide and refuses another, so a run asking for a different one starts afresh.
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision:
        AcceleratorState._reset_state()
    # Only families whose LoRA leaves some weights without a gradient (ModelFamily.ddp_find_unused_parameters)
    # pay for DDP's per-step search for them.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(mixed_precision=precision, cpu=not cuda, kwargs_handlers=[ddp])


def _shared_run_dir(accelerator: Any, run_dir: Path) -> Path:
    """Every rank writes where rank 0 does (each resolved its own ${now:...})."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = Path(broadcast_object_list([str(run_dir)])[0])
        if shared.resolve() != run_dir.resolve():
            _drop_own_run_dir(run_dir, shared / "ranks" / str(accelerator.process_index))
        run_dir = shared
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _drop_own_run_dir(own: Path, rank_dir: Path) -> None:
    """A rank that started a second after rank 0 got a Hydra run dir of its own, holding only Hydra's record
    (.hydra/) and this rank's log: move the log to `rank_dir` beside rank 0's files and remove the dir, so one
    run leaves one run dir. A dir holding anything else is left alone."""
    import shutil

    if not own.is_dir():
        return
    if any(p.name != ".hydra" and not (p.is_file() and p.suffix == ".log") for p in own.iterdir()):
        return
    rank_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):  # Hydra's file handler writes into `own`
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == own.resolve():
            handler.close()
            moved = rank_dir / Path(handler.baseFilename).name
            shutil.move(handler.baseFilename, moved)
            replacement = logging.FileHandler(moved, encoding=handler.encoding)
            replacement.setFormatter(handler.formatter)
            replacement.setLevel(handler.level)
            root.removeHandler(handler)
            root.addHandler(replacement)
    shutil.rmtree(own, ignore_errors=True)
