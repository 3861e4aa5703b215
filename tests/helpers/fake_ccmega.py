"""Stand-in for `python -m ccmega.cli` in the SLURM script tests (through tests/fake_python.sh).

Appends {"argv", "restart", "procid", "ntasks", "cuda_visible_devices"} to $FAKE_LOG, then:
  --dry-run in argv            exit $FAKE_EXIT (default 0) at once;
  first start of the job       with FAKE_WAIT_FOR_SIGNAL=1: write RUN_DIR/started and wait for USR1/TERM,
                               then write status.json "interrupted" (as the training loop does) and exit 0;
  otherwise                    write status.json "finished" (iteration = steps = 2) and exit 0.
"""
import json
import os
import signal
import sys
import time


def write_status(run_dir, state, iteration):
    if os.environ.get("SLURM_PROCID", "0") == "0":
        with open(os.path.join(run_dir, "status.json.tmp"), "w") as f:
            json.dump({"state": state, "iteration": iteration, "steps": 2, "skipped_steps": 0}, f)
        os.replace(os.path.join(run_dir, "status.json.tmp"), os.path.join(run_dir, "status.json"))


def main(argv):
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    record = {"argv": argv, "restart": restart, "procid": os.environ.get("SLURM_PROCID"),
              "ntasks": os.environ.get("SLURM_NTASKS"), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if os.environ.get("FAKE_LOG"):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps(record) + "\n")
    print("fake ccmega:", " ".join(argv), flush=True)
    if "--dry-run" in argv:
        return int(os.environ.get("FAKE_EXIT", "0"))
    run_dir = argv[argv.index("--run-dir") + 1]
    if restart == 0 and os.environ.get("FAKE_WAIT_FOR_SIGNAL") == "1":
        def stop(signum, _frame):
            print(f"fake ccmega: got signal {signum}: checkpoint, status interrupted", flush=True)
            write_status(run_dir, "interrupted", 1)
            sys.exit(0)
        signal.signal(signal.SIGUSR1, stop)
        signal.signal(signal.SIGTERM, stop)
        open(os.path.join(run_dir, "started"), "w").close()
        time.sleep(300)
        return 3  # no signal came
    write_status(run_dir, "finished", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
