"""Shared test fixtures: tiny datasets in the exact on-disk formats of the real loaders."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from stamp_min.data import Dataset


def write_cifar100(root, n_train_per_class=3, n_test_per_class=2, num_classes=100, seed=0):
    """Write a tiny CIFAR-100 in torchvision's on-disk format: root/cifar-100-python/{train,test,meta}.

    Each file is a pickle of a dict; 'data' is (N, 3072) uint8, rows = the R, G, B planes of a
    32x32 image; labels under 'fine_labels' (and 'coarse_labels'); meta holds 'fine_label_names'.
    Returns the (N, 3, 32, 32) images and labels written to each split, for comparison.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = np.repeat(np.arange(num_classes), n)
        images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
        entry = {"filenames": [f"img{i}.png" for i in range(len(labels))], "batch_label": split,
                 "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                 "data": images.reshape(len(labels), 3072)}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
        written[split] = (torch.from_numpy(images), torch.from_numpy(labels))
    meta = {"fine_label_names": [f"class{i}" for i in range(num_classes)],
            "coarse_label_names": [f"super{i}" for i in range(num_classes // 5)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f)
    return written


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """torchvision checks the md5 of the real CIFAR files; tiny files cannot match it."""
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (restored after): sums then run in one fixed order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_dataset(num_classes=6, per_class=20, size=8, channels=1, seed=0):
    """A small in-memory Dataset whose classes are separable (class-dependent mean brightness)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    base = (y.float() * 255 / num_classes).view(-1, 1, 1, 1)
    x = (base + 20 * torch.randn(len(y), channels, size, size, generator=g)).clamp(0, 255).to(torch.uint8)
    yt = torch.arange(num_classes).repeat_interleave(5)
    xt = (yt.float() * 255 / num_classes).view(-1, 1, 1, 1).expand(-1, channels, size, size).to(torch.uint8)
    return Dataset("toy", x, y, xt.contiguous(), yt, num_classes, (0.5,) * channels, (0.25,) * channels)


def assert_same_run(a, b):
    """Results dicts a and b of one experiment (e.g. interrupted and resumed vs uninterrupted) agree
    exactly: accuracy matrix, summary metrics, bytes, and every round's loss."""
    for key in ("acc_matrix", "avg_accuracy", "avg_forgetting", "bwt", "current_task_accuracy", "comm_bytes", "buffer_bytes"):
        assert a[key] == b[key], key
    assert [x["loss"] for x in a["rounds"]] == [x["loss"] for x in b["rounds"]]


@pytest.fixture(scope="session")
def notebook(request):
    """A course notebook's live kernel after its smoke run (tests/nbkernel.py), for tests parametrized
    indirectly with the notebook's number ('01' … '10'). pytest runs the tests of one notebook together
    (test_exercises.py's, then test_notebooks.py's), then its kernel stops."""
    import nbkernel
    kernel = nbkernel.executed(request.param)
    yield kernel
    nbkernel.release(request.param)


# The development tier, `pytest -m "not slow"`, leaves out the notebooks (marked in their own files), every test
# that starts Flower's simulation engine (its `own_ray` fixture: a Ray and one actor per client, a minute or two)
# and the end-to-end runs below, the longest of the suite (several seconds each on an idle 2-core machine,
# minutes together); `pytest`, tests/run.py and .ci/run run everything. A name is a test function (all its
# parameters).
SLOW = ("test_flower.py::test_loopback_deployment",
        "test_workbench.py::test_a_preset_is_bit_identical_to_its_explicit_pair", "test_workbench.py::test_each_rule_keyword_is_used",
        "test_workbench.py::test_the_readme_example_runs", "test_workbench.py::test_match_reaches_tam_and_sam",
        "test_workbench.py::test_resume_refuses_other_functions", "test_workbench.py::test_a_rule_pair_without_a_preset",
        "test_workbench.py::test_passing_the_librarys_own_rules_changes_nothing",
        "test_workbench.py::test_the_round_log_has_the_step_sizes_computed_by_hand",
        "test_stamp.py::test_every_method_runs", "test_checkpoint.py::test_killed_and_resumed_equals_uninterrupted",
        "test_checkpoint.py::test_resume_with_other_settings_is_refused",
        "test_checkpoint.py::test_corrupt_foreign_and_unsafe_checkpoints_are_one_line_errors",
        "test_faults.py::test_sigterm_during_a_run", "test_faults.py::test_a_full_disk_is_one_line",
        "test_faults.py::test_a_file_size_limit_is_one_line", "test_fcl_loop.py::test_cli_end_to_end",
        "test_flora_na.py::test_cli_smoke", "test_clones.py::test_resnet18_in_float64_batched_equals_the_loop",
        "test_claims.py::test_quick_run_writes_every_claim", "test_gpu_check.py::test_gpu_check_dry_run",
        "test_beat_replay.py::test_quick_run_end_to_end", "test_beat_replay.py::test_time_estimate_runs_every_arm_once",
        "test_study.py::test_the_command_line_study_is_interrupted_by_sigterm_and_resumes",
        "test_run.py::test_the_runner_passes_options_and_returns_pytests_code")


# Marked `ray` (and slow): the tests that start a Ray, through the `own_ray` fixture (Flower's simulation engine) or
# as named here. tests/run.py runs them last, alone: Ray's node must start within a fixed 30 s.
RAY = ("test_study.py::test_ray_cluster_gives_the_local_engines_results",)


# A notebook's tests share its kernel (the `notebook` fixture): its smoke run first, then the exercises, then the
# variations, which run cells again with other settings and leave the kernel so. Whatever the order of the files on
# the command line (with test_notebooks.py first, 01's exercise 1 was checked against 01 rerun with other settings).
KERNEL_ORDER = ("test_notebook_runs_in_smoke_mode", "test_exercise", "test_printed_text_follows_the_settings")


def pytest_collection_modifyitems(items):
    for item in items:
        ray = "own_ray" in getattr(item, "fixturenames", ()) or any(name in item.nodeid for name in RAY)
        if ray:
            item.add_marker(pytest.mark.ray)
        if ray or any(name in item.nodeid for name in SLOW):
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):                  # after -m/-k and pytest's grouping by fixture parameter
    items = session.items
    kernel = lambda item: getattr(item, "callspec", None) and item.callspec.params.get("notebook")   # noqa: E731
    rank = lambda item: next((i for i, n in enumerate(KERNEL_ORDER) if item.originalname == n), len(KERNEL_ORDER))  # noqa: E731
    i = 0
    while i < len(items):                               # each run of tests on one kernel: stably, in KERNEL_ORDER
        j = i + 1
        while j < len(items) and kernel(items[i]) and kernel(items[j]) == kernel(items[i]):
            j += 1
        items[i:j] = sorted(items[i:j], key=rank)
        i = j


@pytest.fixture(scope="module")
def own_ray():
    """Flower's simulation engine starts a Ray of its own for the test: RAY_ADDRESS=local, so Ray
    neither joins a cluster another program runs on this machine nor fails on the address file
    (/tmp/ray/ray_current_cluster) that a stopped `ray start --head` leaves behind."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", "local")
        yield
