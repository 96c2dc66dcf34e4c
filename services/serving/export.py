"""``normguard export``: a trained run as files other tools load, with a model card.

* LoRA runs (``model.lora_rank``): ``pytorch_lora_weights.safetensors`` in diffusers' format, written
  by the pipeline's own ``save_lora_weights`` with the adapter's rank, alpha and target modules in
  the file's metadata, so ``StableDiffusion3Pipeline.load_lora_weights(DIR)`` /
  ``FluxPipeline.load_lora_weights(DIR)`` restore the same scaling (and ComfyUI / other tools that read
  diffusers LoRA files can load it).
* Full fine-tunes: a ``transformer/`` folder (``save_pretrained``) that replaces the pipeline's
  transformer: ``SD3Transformer2DModel.from_pretrained(DIR, subfolder="transformer")``.
* The embedded digits model: its ``transformer/`` folder plus the class conditioner
  (``conditioner.safetensors``), loadable with ``services.models.digits``.
* ``README.md``: a model card (base model, method, NormGuard settings, steps, final evaluation and
  norm ratio, the checkpoint it came from).

Nothing is unpickled: the weights come from the checkpoint's ``weights.safetensors``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from services.checkpoints import load_weights, resolve_checkpoint
from services.config import ExperimentConfig
from services.config.families import spec
from services.models.families import family

__all__ = ["export_run"]

LORA_FILE = "pytorch_lora_weights.safetensors"


def _run_config(run_dir: Path) -> ExperimentConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json: pass a run directory written by `normguard train`")
    return ExperimentConfig.model_validate_json(path.read_text())


def _lora_state(weights: dict) -> dict:
    """peft's parameter names (``...to_q.lora_A.default.weight``) -> diffusers' (``...to_q.lora_A.weight``)."""
    return {k.replace(".default.", "."): v for k, v in weights.items()}


def _export_lora(cfg: ExperimentConfig, weights: dict, out: Path) -> list[str]:
    import diffusers

    m = cfg.model
    writer = spec(m.kind).lora_writer  # the family's LoRA file writer
    if writer is None:  # export_run refuses a LoRA run of such a family before it gets here
        raise ValueError(f"the {m.kind} model has no LoRA format to export to")
    pipe_cls = getattr(diffusers, writer)
    metadata = {
        "r": m.lora_rank,
        "lora_alpha": m.lora_alpha or m.lora_rank,
        "target_modules": list(m.lora_targets),
        "init_lora_weights": True,
    }
    parts = family(m.kind).lora_files(weights, LORA_FILE)  # {file name: its transformer's weights}
    for name, part in parts.items():
        pipe_cls.save_lora_weights(
            out, transformer_lora_layers=_lora_state(part), transformer_lora_adapter_metadata=metadata, weight_name=name
        )
    return list(parts)


def _export_transformer(cfg: ExperimentConfig, model_path: str, weights: dict, out: Path) -> list[str]:
    """The base transformer with the trained weights loaded, saved with ``save_pretrained`` (the family's own
    files where it has them: digits adds its class conditioner)."""
    import diffusers

    files = family(cfg.model.kind).export_transformer(model_path, weights, out)
    if files is not None:
        return files
    config = json.loads((Path(model_path) / "transformer" / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    transformer = cls.from_pretrained(model_path, subfolder="transformer")
    missing = set(weights) - set(transformer.state_dict())
    if missing:
        raise KeyError(f"trained weights the base transformer does not have: {sorted(missing)[:5]}")
    transformer.load_state_dict(weights, strict=False)
    transformer.save_pretrained(out / "transformer")
    return ["transformer/"]


def _usage(cfg: ExperimentConfig, base: str) -> str:
    """How to load the export with stock diffusers (the model card's "Use"), and the text length it
    was trained at (diffusers' default is 256 for SD3, 512 for FLUX)."""
    fam, m = spec(cfg.model.kind), cfg.model
    call = f"image = pipe(prompt, max_sequence_length={m.max_sequence_length}).images[0]  # as trained"
    if fam.is_video:  # frames (F, H, W, 3), e.g. diffusers.utils.export_to_video(video, "out.mp4", fps=16)
        frames = (fam.latent_frames(m.num_frames) - 1) * fam.frame_stride + 1
        size = f"height={m.resolution}, width={m.resolution}, num_frames={frames}"
        call = f"video = pipe(prompt, {size}, max_sequence_length={m.max_sequence_length}).frames[0]  # as trained"
    pipe, cls = fam.pipeline_class, fam.transformer_class
    if pipe is not None and cfg.model.lora_rank:
        return f'pipe = {pipe}.from_pretrained("{base}")\npipe.load_lora_weights("<this directory>")\n{call}'
    if pipe is not None:
        load = (
            f'transformer = {cls}.from_pretrained("<this directory>", subfolder="transformer")\n'
            f'pipe = {pipe}.from_pretrained("{base}", transformer=transformer)'
        )
        return f"{load}\n{call}"
    return "from services.models.digits import load_digits_generator  # the transformer/ folder + conditioner"


def _card(cfg: ExperimentConfig, ckpt: Path, run_dir: Path, files: list[str]) -> str:
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    after = summary.get("after", {})
    coord = json.loads((ckpt / "coordinator.json").read_text()) if (ckpt / "coordinator.json").is_file() else {}
    ng = cfg.normguard
    guard = (
        f"constraint: bound 1 + {ng.margin:g}, floor {ng.floor}, {ng.bins} sigma bins"
        if ng.mode == "constraint"
        else (f"penalty: weight {ng.weight:g}, margin {ng.margin:g}, power {ng.power}" if ng.weight > 0 else "off")
    )
    base = cfg.model.path or "the embedded digits model"
    m = cfg.model
    adapter = (
        f"LoRA rank {m.lora_rank}, alpha {m.lora_alpha or m.lora_rank:g}" if m.lora_rank else "none (full fine-tune)"
    )
    tags = ["normguard", cfg.loss.name, "lora" if cfg.model.lora_rank else "full-fine-tune", "flow-matching"]
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {cfg.train.run_name}",
        "",
        f"RL post-training of `{base}` ({cfg.model.kind}) with **{cfg.loss.name}**, exported by `normguard export`",
        f"from `{ckpt}` (RL step {coord.get('step', '?')} of {cfg.train.steps}).",
        "",
        "| | |",
        "|---|---|",
        f"| method | {cfg.loss.name}, lr {cfg.learner.lr:g}, {cfg.rollout.prompts_per_step} prompts x "
        f"{cfg.rollout.group_size} samples per step, {cfg.rollout.num_steps} sampling steps |",
        f"| NormGuard | {guard} |",
        f"| reward | {', '.join(s.name for s in cfg.reward.scorers)} |",
        f"| adapter | {adapter} |",
        f"| files | {', '.join(files)} |",
        "",
    ]
    if after:
        lines += ["## Final evaluation (fixed noise)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(after.items()) if isinstance(v, int | float)]
        ratio = {k: v for k, v in after.items() if "norm_ratio" in k}
        if ratio:
            lines += ["", "Velocity-norm ratio to the base model (1.0 = no inflation): "
                      + ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in ratio.items()) + "."]  # fmt: skip
        lines.append("")
    lines += ["## Use", "", "```python", _usage(cfg, base), "```", ""]
    return "\n".join(lines)


def export_run(run: str | Path, out: str | Path, *, step: int | None = None, overwrite: bool = False) -> Path:
    """Export run directory ``run`` (its newest intact checkpoint, or ``step``) to ``out``."""
    from services.prepare import resolve_model

    run_dir = Path(run)
    cfg = _run_config(run_dir)
    ckpt = resolve_checkpoint(run_dir, step)
    weights = load_weights(ckpt)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model).path
    if cfg.model.lora_rank and spec(cfg.model.kind).lora_writer is None:
        raise ValueError(
            f"a LoRA run of the {cfg.model.kind} model has no LoRA format to export to; train it without lora_rank"
        )
    if cfg.model.lora_rank:
        files = _export_lora(cfg, weights, out)
    else:
        files = _export_transformer(cfg, model_path, weights, out)
    (out / "README.md").write_text(_card(cfg, ckpt, run_dir, files))
    return out
