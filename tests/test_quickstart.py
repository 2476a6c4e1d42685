"""``o2o quickstart`` with its defaults: WSRL fine-tuning beats SAC from scratch at the same online
budget on every one of its 3 seeds, within the time budget of the README's first command."""

import time

import numpy as np
import pytest

from experiments import offline_to_online as o2o

CPU_SECONDS_BUDGET = 2 * 600
"""Ten minutes on two cores, as process CPU time (wall time depends on what else the machine runs)."""


@pytest.mark.slow
def test_quickstart_wsrl_beats_sac_from_scratch_on_every_seed(tmp_path, capsys):
    args = o2o.QuickstartArgs(out_dir=tmp_path / "quickstart", progress=False)
    assert args.num_seeds == 3
    wall, cpu = time.perf_counter(), time.process_time()
    table = o2o.quickstart(args)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    printed = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n{printed}\nquickstart: {wall:.0f} s wall, {cpu:.0f} s CPU")

    assert table["seeds"] == [0, 1, 2]
    wsrl, scratch = np.array(table["wsrl_final_per_seed"]), np.array(table["scratch_final_per_seed"])
    assert np.all(np.isfinite(wsrl)) and np.all(np.isfinite(scratch))
    for seed, ours, baseline in zip(table["seeds"], wsrl, scratch):
        assert ours > baseline, f"seed {seed}: WSRL {ours:.1f} does not beat SAC from scratch {baseline:.1f}"
    assert table["wsrl_final"] == pytest.approx(wsrl.mean()) and table["scratch_final"] == pytest.approx(scratch.mean())
    for seed, ours, baseline in zip(table["seeds"], wsrl, scratch):
        assert f"| {seed} | {ours:.1f} | {baseline:.1f} |" in printed  # the printed table shows every seed
    assert "on 3 of 3 seeds" in printed
    assert (tmp_path / "quickstart" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert cpu < CPU_SECONDS_BUDGET, f"quickstart used {cpu:.0f} s of CPU (budget {CPU_SECONDS_BUDGET} s)"
