"""services.sweeps.reproduce: verdicts of two paired.csv files compared cell by cell."""

from services.sweeps.reproduce import agreement, load_paired, verdict

HEADER = "method,normguard,vs,metric,diff_mean,diff_ci95,seeds,seeds_favouring_normguard\n"


def test_verdict_by_interval():
    assert verdict(2.0, 1.0) == 1
    assert verdict(-2.0, 1.0) == -1
    assert verdict(0.5, 1.0) == 0


def test_agreement_counts_shared_cells_and_lists_changes(tmp_path):
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_text(
        HEADER + "awm,constraint,kl,frechet,4.5,5.0,3,0\nnft,penalty,none,frechet,3.0,1.0,3,0\n"
        "nft,penalty,none,recall,0.1,0.2,3,1\nonly_old,penalty,none,frechet,1,1,3,0\n"
    )
    new.write_text(
        HEADER + "awm,constraint,kl,frechet,4.0,4.9,3,0\nnft,penalty,none,frechet,0.5,2.0,3,1\n"
        "nft,penalty,none,recall,0.1,0.05,3,1\n"
    )
    n, changed = agreement(load_paired(old), load_paired(new), "frechet")
    assert n == 2
    assert changed == [(("nft", "penalty", "none", "frechet"), (3.0, 1.0), (0.5, 2.0))]
    n, changed = agreement(load_paired(old), load_paired(new), "recall")
    assert (n, len(changed)) == (1, 1)


def test_decisive_agreement_does_not_count_two_level_intervals(tmp_path):
    from services.sweeps.reproduce import decisive_agreement

    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    # both level; both for; for -> level; for -> against
    old.write_text(
        HEADER + "a,c,none,frechet,0.1,1.0,3,1\nb,c,none,frechet,3.0,1.0,3,0\n"
        "c,c,none,frechet,3.0,1.0,3,0\nd,c,none,frechet,3.0,1.0,3,0\n"
    )
    new.write_text(
        HEADER + "a,c,none,frechet,-0.2,1.0,3,2\nb,c,none,frechet,2.5,0.5,3,0\n"
        "c,c,none,frechet,0.5,1.0,3,1\nd,c,none,frechet,-3.0,1.0,3,3\n"
    )
    o, n = load_paired(old), load_paired(new)
    assert agreement(o, n, "frechet")[0] - len(agreement(o, n, "frechet")[1]) == 2
    assert decisive_agreement(o, n, "frechet") == (1, 3, 1)
