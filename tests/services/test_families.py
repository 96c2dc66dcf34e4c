"""The model-family plug-ins: a family's data (``services.config.families``, read by the config and the plan) and
its behaviour (``services.models.families``), registered under the same ``model.kind``; nothing outside them
decides by testing a family's name.

The source checks read the tree without importing it: the issue's grep (``kind ==`` / ``kind in`` ...) over
``services``, ``deploy`` and ``benchmarks``, and an AST pass that also sees a comparison spread over lines or a
table keyed by family names."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest

from services.config import ExperimentConfig, ModelConfig
from services.config.families import EMBEDDED_KINDS, FAMILIES, VARIANTS, architecture, require, spec

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GREPPED = ("services", "deploy", "benchmarks")
REGISTRY = (ROOT / "services" / "config" / "families.py", ROOT / "services" / "models" / "families")
# the issue's grep: grep -rnE "kind (==|!=|in|not in) " services deploy benchmarks
KIND_CHECK = re.compile(r"kind (==|!=|in|not in) ")
# what makes a hit a *model* kind: a family name in quotes, the model section's kind, the family-name sets
_QUOTED = "|".join(map(re.escape, FAMILIES))
MODEL_KIND = re.compile(rf"""["']({_QUOTED})["']|model(_cfg)?\.kind|\bm\.kind|EMBEDDED_KINDS|KNOWN_KINDS""")


def _in_registry(path: Path) -> bool:
    return any(path == r or r in path.parents for r in REGISTRY)


def _grep_hits(root: Path = ROOT) -> list[str]:
    hits = []
    for d in GREPPED:
        for path in sorted((root / d).rglob("*")):
            if not path.is_file() or path.suffix not in (".py", ".yaml", ".yml", ".md", ".toml") or _in_registry(path):
                continue
            for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if KIND_CHECK.search(line):
                    hits.append(f"{path.relative_to(root)}:{no}: {line.strip()}")
    return hits


def test_the_issues_grep_finds_no_model_kind_check_outside_the_registry():
    """What the grep still finds are other ``kind`` fields (run states, learner-group commands, scorer kinds,
    HTTP content types); none of them is a model kind."""
    hits = _grep_hits()
    model = [h for h in hits if MODEL_KIND.search(h.split(": ", 1)[1])]
    assert model == [], "model-kind checks outside the family registry:\n" + "\n".join(model)
    assert not any("model" in h.split(":", 1)[0] for h in hits), hits  # services/models: only the registry


def _names(node: ast.AST) -> set[str]:
    """Family names among the string constants of ``node`` (a constant or a tuple / list / set of them)."""
    elts = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    return {e.value for e in elts if isinstance(e, ast.Constant) and e.value in FAMILIES}


def _is_kind(node: ast.AST) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return "kind" in name.lower() or "family" in name.lower()


def _family_checks(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_kind(s) for s in sides) and any(_names(s) for s in sides):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict) and len(_names(ast.Tuple([k for k in node.keys if k is not None]))) >= 2:
            found.append(f"{path.relative_to(root)}:{node.lineno}: a table keyed by family names")
    return found


def test_no_family_comparison_or_family_table_outside_the_registry():
    files = [p for d in (*GREPPED, "normguard_core") for p in (ROOT / d).rglob("*.py") if not _in_registry(p)]
    assert len(files) > 50, "the scan found too few source files: is ROOT the repository root?"
    found = [hit for p in files for hit in _family_checks(p)]
    assert found == [], "model-family checks outside the registry:\n" + "\n".join(found)


def test_the_checks_see_what_they_forbid(tmp_path):
    src = tmp_path / "services" / "x.py"
    src.parent.mkdir()
    src.write_text(
        'a = cfg.model.kind == "sd3"\nb = kind not in ("digits", "colour")\nc = {"sd3": 1, "flux": 2}\n'
        "d = m.kind in EMBEDDED_KINDS\ne = cmd.kind == 'stop'\n"
    )
    assert len(_family_checks(src, tmp_path)) == 3
    hits = _grep_hits(tmp_path)
    assert len(hits) == 4 and [bool(MODEL_KIND.search(h.split(": ", 1)[1])) for h in hits] == [1, 1, 1, 0]


def test_data_and_behaviour_register_the_same_families():
    from services.models import KNOWN_KINDS
    from services.models.families import FAMILIES as BEHAVIOUR

    assert set(typing.get_args(ModelConfig.model_fields["kind"].annotation)) == set(FAMILIES) == set(KNOWN_KINDS)
    for name, fam in BEHAVIOUR.items():
        assert fam.name == name and fam.spec is FAMILIES[name]
        assert ModelConfig(kind=name, path="p").lora_targets == fam.spec.lora.targets


def test_family_facts_the_config_and_plan_read():
    assert EMBEDDED_KINDS == {"digits", "colour"}
    for name in EMBEDDED_KINDS:  # the embedded tasks integrate on the digits grid, no text encoder
        assert spec(name).grid_shift == ExperimentConfig(model={"kind": name}).rollout.shift == 1.0
        assert not spec(name).has_text_encoder and spec(name).pipeline_class is None
    assert ExperimentConfig(model={"kind": "sd3", "path": "p"}).rollout.shift is None  # the scheduler config's
    assert spec("sd3").text_tokens(128) == 77 + 128 and spec("flux").text_tokens(128) == 128
    assert spec("sd3").timestep_scale == 1000.0 and spec("flux").latent_patch == 2
    variant = spec("sd3").variant
    assert variant("stabilityai/stable-diffusion-3.5-large").name == "sd3.5-large"
    assert variant("stabilityai/stable-diffusion-3.5-medium").name == "sd3.5-medium"
    assert variant("stabilityai/stable-diffusion-3-medium-diffusers").name == "sd3"
    assert spec("flux").variant("black-forest-labs/FLUX.1-dev").name == "flux"
    assert architecture("sd3", "transformer") == ("sd3.5-medium", VARIANTS["sd3"].overrides)
    assert architecture("sd3", "vae") == ("sd3.5-medium", {})
    assert architecture("sd3.5-large", "transformer") == ("sd3.5-large", {})
    assert architecture("flux", "vae") == ("flux1-dev", {})
    for v in VARIANTS.values():
        assert (ROOT / "deploy" / "architectures" / v.folder / "transformer_config.json").is_file(), v


def test_plan_counts_text_encoders_as_the_field_default_says():
    """``memory._loads_text_encoders`` reads ``model.prompt_embeddings`` itself: its old ``getattr`` default
    (``per_actor``) contradicted the field's (``once``)."""
    from services.cluster.memory import _loads_text_encoders, text_tokens

    once = ExperimentConfig(model={"kind": "sd3", "path": "p"})
    assert once.model.prompt_embeddings == "once" and not _loads_text_encoders(once)
    per_actor = ExperimentConfig(model={"kind": "sd3", "path": "p", "prompt_embeddings": "per_actor"})
    assert _loads_text_encoders(per_actor)
    assert text_tokens(ExperimentConfig(model={"kind": "sd3", "path": "p", "max_sequence_length": 64})) == 141


def test_unknown_kind_names_the_registered_ones_and_single_family_tools_refuse_others():
    from services.models.families import family

    for lookup in (spec, family):
        with pytest.raises(KeyError) as err:
            lookup("qwen")
        assert all(name in str(err.value) for name in FAMILIES)
    require("digits", "digits", "unused")
    with pytest.raises(ValueError, match="built for colour"):
        require("digits", "colour", "built for colour")


def test_behaviour_per_family():
    from services.models.families import PipelineFamily, family
    from services.models.pipelines import FluxGenerator, SD3Generator
    from services.prepare import EMBEDDED_TASKS, embedded_task

    assert family("sd3").generator is SD3Generator and family("flux").generator is FluxGenerator
    assert {n for n in FAMILIES if isinstance(family(n), PipelineFamily)} == FAMILIES.keys() - EMBEDDED_KINDS
    assert set(EMBEDDED_TASKS) == EMBEDDED_KINDS
    with pytest.raises(TypeError, match="loads from model.path"):
        embedded_task("flux")
    family("digits").check_prompts(["a handwritten digit 3", ""])
    with pytest.raises(ValueError):
        family("digits").check_prompts(["a cat"])
    family("sd3").check_prompts(["a cat"])  # any text


def test_model_card_loading_code_per_family():
    """``normguard export``'s "Use" section, from the family's data: the stock classes of SD3 and FLUX, LoRA or a
    full transformer; the embedded tasks' own loader."""
    from services.serving.export import _usage

    def usage(kind: str, lora_rank: int | None) -> str:
        cfg = ExperimentConfig(model={"kind": kind, "path": "base/dir", "lora_rank": lora_rank})
        return _usage(cfg, "base/dir")

    call = "image = pipe(prompt, max_sequence_length=128).images[0]  # as trained"
    for kind, pipe, cls in (
        ("sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel"),
        ("flux", "FluxPipeline", "FluxTransformer2DModel"),
    ):
        lora = f'pipe = {pipe}.from_pretrained("base/dir")\npipe.load_lora_weights("<this directory>")\n{call}'
        assert usage(kind, 4) == lora
        full = usage(kind, None)
        assert full.startswith(f'transformer = {cls}.from_pretrained("<this directory>", subfolder="transformer")\n')
        assert f'pipe = {pipe}.from_pretrained("base/dir", transformer=transformer)\n{call}' in full
    for kind in EMBEDDED_KINDS:
        assert usage(kind, None).startswith("from services.models.digits import load_digits_generator")
