"""The config schema: every key of conf/, its type, its allowed values and its range, declared once.

Each config group has one pydantic model here (`data`, `trainer`, `lora`, `optimizer`, `logger`, the model
families, and the inpaint settings). `validate(task, cfg)` checks a composed config right after Hydra builds
it, before any model loads, and raises one UsageError that lists every problem, one line each, naming the key,
the value and what is allowed:

    trainer.max_steps=0 must be a whole number >= 1
    model.pipeline='fill' must be one of: edit_plus, edit_inpaint or null

Values the schema normalizes (a number given where text is meant, `data.random_flip=true`) are written back
into the config, so the code after it reads clean values. What a schema cannot express stays where the work is
done: that paths exist, that files decode, that a resume checkpoint is there.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import annotated_types as at
from omegaconf import DictConfig, ListConfig, OmegaConf, read_write
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo

from stylekit.errors import UsageError

MAX_LISTED = 12  # a config with many problems still fits on a screen
NOT_A_NUMBER = "a boolean is not a number"


def _no_bool(value: Any) -> Any:
    # pydantic would read true as 1; a boolean where a number belongs is a mistake, not a number.
    if isinstance(value, bool):
        raise ValueError(NOT_A_NUMBER)
    return value


def _int(*metadata: Any) -> Any:
    return Annotated[int, BeforeValidator(_no_bool), *metadata]


def _float(*metadata: Any) -> Any:
    return Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False), *metadata]


def _allowed(text: str) -> dict[str, Any]:
    """Field metadata replacing the generated description of what is allowed."""
    return {"json_schema_extra": {"allowed": text}}


def _hint(text: str) -> dict[str, Any]:
    """Field metadata appended to every error of that key (an example value, what the key does)."""
    return {"json_schema_extra": {"hint": text}}


PositiveInt = _int(at.Ge(1))
NonNegativeInt = _int(at.Ge(0))
Number = _float()
PositiveNumber = _float(at.Gt(0))
NonNegativeNumber = _float(at.Ge(0))
Probability = _float(at.Ge(0), at.Le(1))
Auto = Literal["auto"]


class Section(BaseModel):
    """One config group: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, populate_by_name=True)


# --------------------------------------------------------------------------- train


class Data(Section):
    """conf/data: resize (aspect-ratio buckets) or tile."""

    mode: Literal["resize", "tile"] = "resize"
    dataset_dir: str | None = "data/input_images"
    hf_dataset: str | None = None
    split: str = "train"
    revision: str | None = None
    subset: str | None = None
    image_column: str = "image"
    caption_column: str | None = None
    control_column: str | None = None
    resolution: PositiveInt = 1024
    instance_prompt: str = ""
    trigger: str = ""
    caption_dropout: Probability = 0.0
    repeats: PositiveInt = 1
    crop: Literal["center", "random"] = "center"
    random_flip: Probability = 0.0
    max_upscale: Annotated[_float(at.Ge(1)), Field(**_hint("how much an image may be enlarged"))] = 2.0
    control_dir: str | None = None
    class_prompt: str | None = None
    class_dir: str | None = None
    num_class_images: NonNegativeInt = 0
    tile_size: PositiveInt | None = None
    tile_overlap: _float(at.Ge(0), at.Le(0.99)) = 0.25
    uniform_threshold: Probability = 0.02

    @field_validator("random_flip", mode="before")
    @classmethod
    def _flip_flag(cls, value: Any) -> Any:
        # random_flip=true is how other trainers spell it: half the samples flipped.
        return (0.5 if value else 0.0) if isinstance(value, bool) else value


class Lora(Section):
    rank: Annotated[PositiveInt, Field(**_hint("e.g. 4, 16, 64"))] = 16
    alpha: Annotated[PositiveNumber, Field(**_hint("alpha = rank keeps the scale at 1"))] = 16.0
    dropout: _float(at.Ge(0), at.Lt(1)) = 0.0
    target_modules: list[str] | None = None
    target_regex: str | None = None
    use_dora: bool = False

    @field_validator("target_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        import re

        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a valid regular expression ({error})") from None
        return value


Beta = _float(at.Ge(0), at.Lt(1))


class Optimizer(Section):
    name: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = "adamw"
    lr: Annotated[PositiveNumber, Field(**_hint("e.g. 1e-4; prodigy expects 1.0"))] = 1e-4
    weight_decay: NonNegativeNumber = 1e-4
    betas: Annotated[tuple[Beta, Beta], Field(**_allowed("two numbers in [0, 1), e.g. [0.9,0.999]"))] = (
        0.9,
        0.999,
    )
    eps: PositiveNumber = 1e-8


class Trainer(Section):
    max_steps: PositiveInt = 1000
    batch_size: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 1
    max_grad_norm: NonNegativeNumber | None = 1.0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: Auto | bool = "auto"
    cache_latents: bool = True
    cache_dir: str | None = None
    checkpoint_root: str = "outputs/checkpoints"
    checkpoint_every: PositiveInt = 250
    keep_checkpoints: Annotated[PositiveInt, Field(**_hint("keep at least 1 so runs can resume"))] = 2
    resume: Annotated[str, Field(**_allowed("auto, never or a checkpoint folder"))] = "auto"
    validate_every: PositiveInt = 250
    validation_prompts: list[str] = Field(default_factory=list)
    validation_steps: PositiveInt | None = None
    val_images: NonNegativeInt = 1
    lora_format: Literal["diffusers", "comfyui"] = "diffusers"
    prior_loss_weight: NonNegativeNumber = 1.0
    guidance: NonNegativeNumber = 1.0
    timestep_sampling: Literal["sigmoid", "logit_normal", "uniform"] = "sigmoid"
    logit_mean: Number = 0.0
    logit_std: Annotated[PositiveNumber, Field(**_hint("e.g. 1.0"))] = 1.0
    shift: PositiveNumber = 1.0
    snr_gamma: Annotated[NonNegativeNumber | None, Field(**_hint("0 or null: off; 5.0 is usual"))] = None
    noise_offset: NonNegativeNumber = 0.0


class Logger(Section):
    backend: Literal["wandb", "none"] = "wandb"
    project: str = "stylekit"
    entity: str | None = None
    mode: Literal["auto", "online", "offline"] = "auto"
    group: str | None = None
    tags: list[str] | None = Field(default_factory=list)


# --------------------------------------------------------------------------- models


class Inference(Section):
    """A family's published sampling settings (model.inference); null means the pipeline's own default."""

    num_inference_steps: PositiveInt | None = None
    guidance_scale: NonNegativeNumber | None = None
    true_cfg_scale: NonNegativeNumber | None = None
    negative_prompt: str | None = None
    strength: Annotated[
        _float(at.Gt(0), at.Le(1)) | None, Field(**_hint("1.0 repaints the masked region fully"))
    ] = None


class Model(Section):
    """What every family shares (conf/model). Subclasses add their own keys and allowed values."""

    family_class: ClassVar[type | None] = None

    target: str = Field(alias="_target_")
    pretrained: str
    inpaint_pretrained: str | None = None
    pipeline: str | None = None
    revision: str | None = None
    variant: str | None = None
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    quantize: Literal["none", "nf4", "int8"] = "none"
    offload: Literal["none", "model", "sequential"] = "none"
    device: Literal["cpu", "cuda"] | None = None
    resolution: PositiveInt = 1024
    native_area: PositiveInt = 1024 * 1024
    lora_targets: list[str] | None = None
    inference: Inference = Field(default_factory=Inference)


def _family_model(family: type, base: type[Model] = Model, **fields: Any) -> type[Model]:
    """The model schema of a family: its pipelines as the allowed `pipeline` values, `resolution` a multiple
    of its pixel grid, plus its own keys."""
    from pydantic import create_model

    step = family.resolution_multiple
    resolution = (_int(at.Ge(step), at.MultipleOf(step)), 1024)
    pipeline = (Literal[tuple(family.inpaint_pipeline_classes)] | None, None)
    schema = create_model(
        f"{family.__name__}Config", __base__=base, pipeline=pipeline, resolution=resolution, **fields
    )
    schema.family_class = family
    return schema


class OtherModel(Model):
    """A family stylekit does not ship (a `_target_` of your own): the shared keys are checked, its own pass."""

    model_config = ConfigDict(extra="allow")


@cache
def _other_family(target: str) -> type[Model]:
    """A `_target_` stylekit does not ship: a ModelFamily subclass keeps its pipelines and pixel grid as
    checks (its own keys pass unchecked); anything else gets the shared keys only."""
    from stylekit.models.base import ModelFamily

    try:
        from hydra.utils import get_class

        family = get_class(target)
    except Exception:  # not importable here: instantiating it reports that, after these checks
        return OtherModel
    if (
        isinstance(family, type)
        and issubclass(family, ModelFamily)
        and hasattr(family, "resolution_multiple")
    ):
        return _family_model(family, OtherModel)
    return OtherModel


@cache
def model_schemas() -> dict[str, type[Model]]:
    """`_target_` -> the model schema of each family stylekit ships."""
    from stylekit.models.flux import FluxFamily
    from stylekit.models.qwen_edit import QwenEditFamily
    from stylekit.models.sdxl import SDXLFamily

    families: list[tuple[type, dict[str, Any]]] = [
        (FluxFamily, {"max_sequence_length": (_int(at.Ge(1), at.Le(512)), 512)}),
        (SDXLFamily, {"prediction_type": (Literal["epsilon", "v_prediction"] | None, None)}),
        (QwenEditFamily, {"condition_area": (PositiveInt, 1024 * 1024), "vl_condition_area": (PositiveInt, 384 * 384)}),
    ]  # fmt: skip
    return {
        f"{family.__module__}.{family.__qualname__}": _family_model(family, **extra)
        for family, extra in families
    }


# --------------------------------------------------------------------------- inpaint


class Mask(Section):
    threshold: Annotated[_float(at.Gt(0), at.Le(1)), Field(**_hint("0.5 suits black/white masks"))] = 0.5
    grow: Annotated[int, BeforeValidator(_no_bool), Field(**_hint("pixels; negative shrinks"))] = 0
    feather: Annotated[NonNegativeInt, Field(**_hint("pixels of inward soft edge"))] = 0
    resize: bool = False


class InpaintOptions(Section):
    mask: Mask = Field(default_factory=Mask)
    context: Annotated[
        float | str, Field(**_allowed("a factor of the mask's box like 0.5, or pixels like 64px"))
    ] = 0.5
    max_upscale: Annotated[_float(at.Ge(1)), Field(**_hint("how much a small crop may be enlarged"))] = 4.0
    preprocess: list[str] = Field(default_factory=list)
    postprocess: list[str] = Field(default_factory=list)

    @field_validator("context", mode="before")
    @classmethod
    def _context(cls, value: Any) -> Any:
        from stylekit.inpaint.masks import parse_context

        _no_bool(value)
        try:
            parse_context(value)
        except UsageError as error:  # its message starts with the key and value, which the line adds itself
            text = str(error)
            for given in (f"inpaint.context={value!r} ", f"inpaint.context={value} "):
                text = text.removeprefix(given)
            raise ValueError(text) from None
        return value


class InpaintConfig(Section):
    """conf/inpaint.yaml."""

    task_name: str = "inpaint"
    image: str | None = None
    mask: str | None = None
    prompt: Annotated[str, Field(**_hint('pass prompt="what to paint in the masked region"'))]
    negative_prompt: str | None = None
    num_inference_steps: PositiveInt | None = None
    guidance_scale: NonNegativeNumber | None = None
    true_cfg_scale: NonNegativeNumber | None = None
    strength: Annotated[
        _float(at.Gt(0), at.Le(1)) | None,
        Field(**_hint("null for the model's default; 1.0 repaints the masked region fully")),
    ] = None
    seed: _int() = 0
    num_images: PositiveInt = 1
    lora_weights: str | list[str] | None = None
    output_dir: str | None = None
    save_comparison: bool = False
    skip_existing: bool = False
    inpaint: InpaintOptions = Field(default_factory=InpaintOptions)
    model: dict[str, Any]
    logger: Logger = Field(default_factory=Logger)


class TrainConfig(Section):
    """conf/train.yaml."""

    task_name: str = "train"
    seed: _int() = 42
    output_dir: str | None = None
    model: dict[str, Any]
    data: Data = Field(default_factory=Data)
    lora: Lora = Field(default_factory=Lora)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    trainer: Trainer = Field(default_factory=Trainer)
    logger: Logger = Field(default_factory=Logger)


SCHEMAS: dict[str, type[Section]] = {"train": TrainConfig, "inpaint": InpaintConfig}


# --------------------------------------------------------------------------- validation


def validate(task: str, cfg: DictConfig | Mapping[str, Any]) -> None:
    """Check the composed config of `task`; one UsageError lists every problem. Normalized values are written
    back into `cfg`."""
    raw = {k: v for k, v in _plain(cfg).items() if k != "hydra"}  # a config composed with Hydra's own node
    problems, clean = _check(SCHEMAS[task], raw, ())
    model_raw = raw.get("model")
    if isinstance(model_raw, Mapping):
        target = str(model_raw.get("_target_", ""))
        schema = model_schemas().get(target) or _other_family(target)
        model_problems, model_clean = _check(schema, model_raw, ("model",))
        problems += model_problems
        if clean is not None and model_clean is not None:
            clean["model"] = model_clean
    if problems:
        raise UsageError(listed(problems))
    if clean is not None and isinstance(cfg, DictConfig):
        with read_write(cfg):
            _write_back(cfg, raw, clean, ())


def listed(problems: list[str]) -> str:
    """Problems as the lines of one error, duplicates dropped, cut to fit a screen."""
    problems = list(dict.fromkeys(problems))
    extra = len(problems) - MAX_LISTED
    return "\n".join(problems[:MAX_LISTED] + ([f"... and {extra} more"] if extra > 0 else []))


def section(schema: type[Section], values: Mapping[str, Any], prefix: str) -> Section:
    """One group's values checked on their own (code that receives a `data` mapping rather than a run
    config); the same messages as `validate`, keys named under `prefix`."""
    known = {k: v for k, v in values.items() if k in schema.model_fields or k in _aliases(schema)}
    try:
        return schema.model_validate(known)
    except ValidationError as error:
        raise UsageError("\n".join(_messages(schema, error, (prefix,) if prefix else (), known))) from None


def _check(schema: type[Section], raw: Mapping[str, Any], prefix: tuple[str, ...]) -> tuple[list[str], Any]:
    try:
        return [], schema.model_validate(raw).model_dump(by_alias=True)
    except ValidationError as error:
        return _messages(schema, error, prefix, raw), None


def _plain(cfg: Any) -> Any:
    """The config as plain Python, interpolations resolved; one that cannot resolve (`${hydra:...}` outside
    a Hydra app) is left as None, `???` (not given) is left out."""
    if isinstance(cfg, DictConfig):
        out = {}
        for key in cfg:
            if OmegaConf.is_missing(cfg, key):
                continue
            try:
                value = cfg[key]
            except Exception:
                value = None
            out[str(key)] = _plain(value)
        return out
    if isinstance(cfg, ListConfig):
        return [_plain(item) for item in cfg]
    if isinstance(cfg, Mapping):
        return {str(k): _plain(v) for k, v in cfg.items()}
    return cfg


def _write_back(
    cfg: DictConfig, raw: Mapping[str, Any], clean: Mapping[str, Any], path: tuple[str, ...]
) -> None:
    """Set the keys whose checked value differs from what was given (a number where text is meant, a flag
    where a probability is): such a key holds the clean value from now on, even where it was an
    interpolation. Keys the config lacks stay absent; keys whose value is already clean are left alone."""
    for key, given in raw.items():
        if key not in clean:
            continue
        value = clean[key]
        if isinstance(given, Mapping) and isinstance(value, Mapping):
            _write_back(cfg, given, value, (*path, key))
        elif _differs(given, value):
            OmegaConf.update(cfg, ".".join((*path, key)), list(value) if isinstance(value, tuple) else value)


def _differs(given: Any, value: Any) -> bool:
    if isinstance(given, bool) is not isinstance(value, bool):
        return True  # False == 0.0 in Python, but a flag where a number belongs must be replaced
    if isinstance(value, tuple | list) and isinstance(given, list | tuple):
        return len(given) != len(value) or any(_differs(g, v) for g, v in zip(given, value, strict=True))
    return (
        type(given) is not type(value)
        and not (isinstance(given, int) and isinstance(value, float))
        or (given != value)
    )


# --------------------------------------------------------------------------- messages


def _aliases(schema: type[BaseModel]) -> dict[str, str]:
    return {f.alias: name for name, f in schema.model_fields.items() if f.alias}


def _messages(
    schema: type[BaseModel], error: ValidationError, prefix: tuple[str, ...], raw: Mapping[str, Any]
) -> list[str]:
    """One line per key: `key=value must be <what is allowed>`, however many union branches pydantic tried."""
    by_key: dict[str, list[str]] = {}
    for item in error.errors():
        key, field, owner = _locate(schema, item["loc"])
        name = ".".join((*prefix, *key))
        if item["type"] == "extra_forbidden":
            by_key.setdefault(name, []).append(unknown_key_line(name, _aliases_or_names(owner)))
            continue
        whole_key = len(key) == len(item["loc"])  # not an element of a list or tuple
        if whole_key and (
            item["type"] == "missing"
            or (item.get("input") is None and field is not None and field.is_required())
        ):
            hint = _extra(field, "hint")
            by_key.setdefault(name, []).append(f"{name} is required" + (f"; {hint}" if hint else ""))
            continue
        value = _at(raw, key, item.get("input"))
        allowed = _extra(field, "allowed")
        reason = str(item["msg"]).removeprefix("Value error, ") if item["type"] == "value_error" else ""
        hint = _extra(field, "hint")
        if reason and reason != NOT_A_NUMBER:
            # The validator's own reason says more than the type (a regex that does not compile, a factor
            # past its maximum).
            sep = " " if reason.startswith(("must ", "is ")) else ": "
            line = f"{name}={_show(value)}{sep}{reason}"
        else:
            line = f"{name}={_show(value)} must be {allowed or _describe(field)}" + (
                f" ({hint})" if hint else ""
            )
        by_key.setdefault(name, []).append(line)
    return [lines[0] for lines in by_key.values()]


def unknown_key_line(full_key: str, known: list[str]) -> str:
    """`trainer.max_step is not a setting of trainer (did you mean trainer.max_steps?); its keys are: ...`"""
    import difflib

    where, _, name = full_key.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1)
    guess = f" (did you mean {where + '.' if where else ''}{close[0]}?)" if close else ""
    return f"{full_key} is not a setting of {where or 'the config'}{guess}; its keys are: {', '.join(known)}"


def _at(raw: Any, key: tuple[str, ...], default: Any) -> Any:
    """The value given for `key` (a whole list, not the element pydantic points into)."""
    for part in key:
        if not isinstance(raw, Mapping) or part not in raw:
            return default
        raw = raw[part]
    return raw


def _aliases_or_names(schema: type[BaseModel] | None) -> list[str]:
    if schema is None:
        return []
    return [f.alias or name for name, f in schema.model_fields.items()]


def _locate(schema: type[BaseModel], loc: tuple[Any, ...]) -> tuple[tuple[str, ...], FieldInfo | None, Any]:
    """The config key an error location names (union branches and list indices dropped), its field, and
    the section that owns it."""
    key: list[str] = []
    field: FieldInfo | None = None
    owner: Any = schema
    current: Any = schema
    for part in loc:
        model = _model_in(current)
        if model is None or not isinstance(part, str):
            break
        name = _aliases(model).get(part, part)
        if name not in model.model_fields:
            owner = model
            key.append(part)
            field = None
            break
        owner = model
        field = model.model_fields[name]
        key.append(part)
        current = field.annotation
    return tuple(key), field, owner


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _extra(field: FieldInfo | None, name: str) -> str | None:
    if field is None:
        return None
    extra = field.json_schema_extra
    if isinstance(extra, dict) and name in extra:
        return str(extra[name])
    for meta in field.metadata:
        extra = getattr(meta, "json_schema_extra", None)
        if isinstance(extra, dict) and name in extra:
            return str(extra[name])
    return None


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "{...}"
    if isinstance(value, list | tuple):  # as it would be typed: [to_q, null]
        return "[" + ", ".join(v if isinstance(v, str) else _show(v) for v in value) + "]"
    return str(value)


def _describe(field: FieldInfo | None) -> str:
    """What a field accepts, in words, from its type and bounds."""
    if field is None:
        return "valid"
    return _describe_type(field.annotation, list(field.metadata))


def _describe_type(annotation: Any, metadata: list[Any]) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        return _describe_type(base, [*metadata, *extra])
    if origin in (Union, UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        nullable = " or null" if type(None) in get_args(annotation) else ""
        if all(get_origin(_strip(a)) is Literal or _strip(a) is bool for a in options):
            return _join_choices(options) + nullable
        return (
            " or ".join(_describe_type(arg, metadata if len(options) == 1 else []) for arg in options)
            + nullable
        )
    if origin is Literal:
        return "one of: " + ", ".join(str(v) for v in get_args(annotation))
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "a whole number" + _bounds(metadata)
    if annotation is float:
        return "a number" + _bounds(metadata)
    if annotation is str:
        return "text"
    if origin is list:
        return (
            f"a list of {_plural(_describe_type(get_args(annotation)[0], []))}"
            if get_args(annotation)
            else "a list"
        )
    if origin is tuple:
        return "a list"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping of settings"
    return str(annotation)


def _plural(description: str) -> str:
    return {"text": "text", "a whole number": "whole numbers", "a number": "numbers"}.get(
        description, description
    )


def _strip(annotation: Any) -> Any:
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _join_choices(options: list[Any]) -> str:
    words: list[str] = []
    for option in map(_strip, options):
        words += ["true", "false"] if option is bool else [str(v) for v in get_args(option)]
    return "one of: " + ", ".join(words)


def _bounds(metadata: list[Any]) -> str:
    low = high = None
    for meta in _flatten(metadata):
        for attr, symbol in (("ge", ">="), ("gt", ">")):
            if getattr(meta, attr, None) is not None:
                low = (symbol, getattr(meta, attr))
        for attr, symbol in (("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                high = (symbol, getattr(meta, attr))
        if getattr(meta, "multiple_of", None) is not None:
            return f" that is a multiple of {meta.multiple_of}" + (f" ({low[0]} {low[1]:g})" if low else "")
    if low and high:
        return f" in {'[' if low[0] == '>=' else '('}{low[1]:g}, {high[1]:g}{']' if high[0] == '<=' else ')'}"
    if low:
        return f" {low[0]} {low[1]:g}"
    if high:
        return f" {high[0]} {high[1]:g}"
    return ""


def _flatten(metadata: list[Any]) -> list[Any]:
    out: list[Any] = []
    for meta in metadata:
        if isinstance(meta, FieldInfo):
            out += _flatten(list(meta.metadata))
        else:
            out.append(meta)
    return out


def choices(schema: type[BaseModel], name: str) -> tuple[str, ...]:
    """The allowed values of a Literal field, for code that lists them (the memory estimator, docs)."""
    annotation = schema.model_fields[name].annotation
    return tuple(
        v for arg in (annotation, *get_args(annotation)) if get_origin(arg) is Literal for v in get_args(arg)
    )
