"""train.keep_memory: memory a step frees is reused by the next instead of faulted in again."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch
    from mimkit.train.malloc import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def step():  # what a training step does to memory: large blocks allocated, written, freed
        # 2 x 40 MB: above the 32 MB up to which glibc's own threshold may adapt and keep blocks
        xs = [torch.ones(10_000_000) for _ in range(2)]
        return sum(float(x[-1]) for x in xs)
    counts = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # glibc places the first few steps' blocks at new addresses until freed holes fit them (up to 8
    # steps were seen); the median of the last 8 steps is the step once the heap has its working size
    print(sorted(counts[-8:])[4])
""")


def faults_per_step(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    # 80 MB of fresh pages per step is 19,531 faults of 4 KiB; kept memory is written in place.
    assert faults_per_step("default") > 15_000
    assert faults_per_step("keep") < 500
