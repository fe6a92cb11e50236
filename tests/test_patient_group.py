"""
dist_util.patient_group: processes that meet after unequal work (the ranks of an
archive run, each done with its own scenes at its own time) wait for each other
beyond the default group's collective timeout, which would otherwise end the run of
a rank that finished early.
"""

import json
import subprocess
import sys

# Each of two ranks: the collectives' timeout shortened to 2 s, rank 1 arriving 5 s
# late at a gather over the patient group (or, as the control, the default group).
WORKER = r"""
import datetime, json, os, sys, time
from guided_diffusion import dist_util
dist_util.COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=2)
dist_util.setup_dist()
rank = dist_util.get_rank()
group = dist_util.patient_group() if sys.argv[1] == "patient" else None
if rank == 1:
    time.sleep(5)
report = os.path.join(sys.argv[2], f"{sys.argv[1]}{rank}.json")
try:
    got = dist_util.all_gather_object(rank, group=group)
    with open(report, "w") as f:
        json.dump({"rank": rank, "got": got}, f)
except Exception as err:
    with open(report, "w") as f:
        json.dump({"rank": rank, "error": type(err).__name__}, f)
    raise SystemExit(3)
"""


def _reports(tmp_path, mode):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc_per_node", "2", str(script), mode, str(tmp_path)],  # fmt: skip
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # each rank's own file: their lines on the launcher's stdout may interleave
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob(f"{mode}*.json"))]
    return {r["rank"]: r for r in reports}


def test_a_rank_late_past_the_collective_timeout_is_waited_for(tmp_path):
    reports = _reports(tmp_path, "patient")
    assert reports == {0: {"rank": 0, "got": [0, 1]}, 1: {"rank": 1, "got": [0, 1]}}
    # the control: the default group gives up on the late rank
    control = _reports(tmp_path, "default")
    assert control[0] == {"rank": 0, "error": "RuntimeError"}
