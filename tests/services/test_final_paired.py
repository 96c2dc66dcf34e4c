"""services.sweeps.final_paired: trials read from summary.json and paired by seed."""

import json

from services.sweeps.final_paired import load_trials, paired_table


def _trial(root, arm, method, seed, fd, reward):
    d = root / "trials" / f"arm-{arm}_name-{method}_seed-{seed}"
    d.mkdir(parents=True)
    after = {"train/final_reward": reward, "eval/frechet_20steps": fd}
    after.update({f"eval/{k}_20steps": 0.5 for k in ("colour_clip", "colour_judge", "colour_realism", "norm_ratio")})
    after.update({f"eval/{k}_20steps": 0.0 for k in ("colour_saturation", "colour_brightness")})
    (d / "summary.json").write_text(json.dumps({"after": after}))
    params = {"loss.name": method, "arm": arm, "train.seed": seed}
    (d / "trial.json").write_text(json.dumps({"params": params}))


def test_paired_differences_by_seed(tmp_path):
    for seed, (fd_none, fd_con) in enumerate([(40.0, 30.0), (50.0, 44.0), (45.0, 37.0)]):
        _trial(tmp_path, "none", "diffusion_nft", seed, fd_none, 0.13)
        _trial(tmp_path, "constraint", "diffusion_nft", seed, fd_con, 0.13)
    trials = load_trials(tmp_path)
    assert set(trials) == {(m, a, s) for m in ["diffusion_nft"] for a in ["none", "constraint"] for s in range(3)}
    table = paired_table(trials, "diffusion_nft", 20)
    row = next(line for line in table.splitlines() if line.startswith("| constraint − none"))
    # differences -10, -6, -8: mean -8, sd 2, half-width 4.303 * 2 / sqrt(3) = 4.97
    assert "-8 ± 4.97" in row
    assert "| none (n=3) | 0.13 | 0.5 | 45 |" in table
    assert not any(line.startswith("| kl") for line in table.splitlines())  # no kl trials: no kl rows
