"""Multi-node runs need one OUTPUT_DIR that every node sees; a run without one stops at start, saying so."""

import os
import subprocess
import sys

import pytest

from llava.train.checkpoints import spans_nodes
from tests.test_scripts import REPO, free_port

NOT_SHARED = "is not shared between the nodes"
NEEDS = "multi-node runs need a shared file system (docs/training.md#on-a-cluster)"


@pytest.mark.parametrize("env, expect", [
    ({}, False),  # one process, no launcher
    ({"WORLD_SIZE": "1"}, False),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, False),  # torchrun, one node
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, True),  # torchrun, two nodes
    ({"WORLD_SIZE": "2", "LOCAL_SIZE": "2"}, False),  # DeepSpeed's launcher, one node
    ({"WORLD_SIZE": "2", "LOCAL_SIZE": "1"}, True),  # DeepSpeed's launcher, --no_ssh --node_rank: two nodes
    ({"WORLD_SIZE": "4"}, True),  # nothing says what runs here: it may span nodes, so check
])
def test_spans_nodes(env, expect):
    assert spans_nodes(env) is expect


@pytest.mark.slow
def test_two_nodes_with_separate_output_dirs_both_stop_at_start(tiny_llava_dir, tmp_path):
    """Two "nodes" (the scripts' launcher, NODE_RANK 0 and 1, no ssh) each with its own local OUTPUT_DIR."""
    from tests.conftest import write_preference_set

    write_preference_set(tmp_path / "data", n=4, seed=1)
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    env = {**os.environ, "MODEL_PATH": str(tiny_llava_dir), "DATA_PATH": "data/preference.json", "IMAGE_FOLDER": "data",
           "ZERO": "zero2", "REPORT_TO": "none", "PYTHON": sys.executable, "HOSTFILE": "hostfile",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(["bash", str(REPO / "scripts/mcmdpo.sh"), "--max_steps", "1"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "NODE_RANK": str(rank), "OUTPUT_DIR": f"node{rank}-local"}) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode != 0, output[-3000:]
        lines = [line for line in output.splitlines() if NOT_SHARED in line]
        assert lines, output[-3000:]
        # every rank names the directory it was given and the rank that could not see rank 0's marker
        assert f"error: OUTPUT_DIR {tmp_path / f'node{rank}-local'} {NOT_SHARED} (rank 1 on " in lines[0]
        assert lines[0].endswith(NEEDS)
        assert "Traceback" not in output
    assert not (tmp_path / "node0-local" / "ref_logps").exists()  # stopped before the reference (or any model)
    assert not list((tmp_path / "node0-local").glob(".shared-check-*"))  # rank 0 cleans up its marker
    assert not (tmp_path / "node1-local").exists()  # only rank 0 creates the directory
