"""run.json's environment record (`audit.run.provenance.environment_section`) against values
known in the test: torch's and numpy's own versions, the thread count and the flags set here,
the seeds of the settings; and `environment_differences` naming what differs."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata

import numpy as np
import pytest
import torch

from audit.config import AuditSettings
from audit.run.provenance import environment_differences, environment_section


@pytest.fixture
def threads_and_flags():
    """Set the thread count and deterministic flag the record must show; restore after."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.backends.cuda.matmul.allow_tf32)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.set_num_threads(before[0])
    torch.use_deterministic_algorithms(before[1])
    torch.backends.cuda.matmul.allow_tf32 = before[2]


def test_record_holds_known_values(threads_and_flags) -> None:
    settings = AuditSettings(seed=11, random_init=True, model_seed=5)
    env = environment_section(settings)
    json.dumps(env)  # run.json must hold it as it is
    assert env["distributions"]["torch"] == metadata.version("torch")
    assert env["distributions"]["numpy"] == np.__version__
    assert env["distributions"]["cxr-audit"] == metadata.version("cxr-audit")
    assert len(env["distributions"]) == len({d.metadata["Name"].lower().replace("_", "-")
                                             for d in metadata.distributions()
                                             if d.metadata["Name"]})
    assert env["python"]["version"] == platform.python_version()
    assert env["python"]["executable"] == sys.executable
    assert env["os"]["system"] == platform.system()
    assert env["cpu"]["logical_cores"] >= 1 and env["cpu"]["model"]
    flags = env["torch"]
    assert flags["version"] == torch.__version__
    assert flags["num_threads"] == 1
    assert flags["deterministic_algorithms"] is True and flags["deterministic_warn_only"] is True
    assert flags["tf32_matmul"] is True
    assert env["seeds"] == {"seed": 11, "costly_sample": 12, "costly_cap": 13,
                            "limit_sample": 14, "model_seed": 5,
                            "torch_initial_seed": torch.initial_seed()}
    assert environment_section(AuditSettings(seed=3))["seeds"]["model_seed"] is None


def test_gpu_is_null_with_a_reason_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu = environment_section(AuditSettings())["gpu"]
    assert gpu["available"] is False
    assert gpu["name"] is None and gpu["driver"] is None and gpu["cuda_runtime"] is None
    assert gpu["reason"].startswith("torch.cuda.is_available() is False")
    assert gpu["torch_cuda_build"] == torch.version.cuda


def test_gpu_is_named_with_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The CUDA branch on a machine without a GPU: torch's answers and nvidia-smi faked with
    known values (a real GPU gives its own)."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 550.54.15\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Known GPU")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    gpu = environment_section(AuditSettings())["gpu"]
    assert gpu == {"available": True, "name": "Known GPU", "count": 2, "driver": "550.54.15",
                   "driver_source": "nvidia-smi", "cuda_runtime": torch.version.cuda,
                   "cudnn": 91002, "torch_cuda_build": torch.version.cuda, "reason": None}


def test_differences_say_what_changed_and_how() -> None:
    env = environment_section(AuditSettings())
    assert all(not v for v in environment_differences(env, env).values())
    other = json.loads(json.dumps(env))
    other["distributions"]["numpy"] = "1.0.0"
    del other["distributions"]["torch"]
    other["torch"]["num_threads"] = 64
    other["python"]["executable"] = "/elsewhere/python"  # where it ran: not compared
    diffs = environment_differences(other, env)
    assert diffs["distributions"] == [f"numpy: 1.0.0 -> {np.__version__}",
                                      f"torch: absent -> {metadata.version('torch')}"]
    assert diffs["torch"] == [f"num_threads: 64 -> {torch.get_num_threads()}"]
    assert diffs["python"] == [] and diffs["gpu"] == []


@pytest.mark.slow  # builds a finished run: CI runs it
def test_run_json_of_a_finished_run_records_it(tmp_path) -> None:
    """assemble's run.json carries the section (a tiny in-process run)."""
    from audit.model import load_model
    from audit.store.rundir import read_run_json
    from tests.run_fixtures import build_run, demo_set_with_dicoms

    images, boxes = demo_set_with_dicoms(tmp_path, n_images=2, n_dicom=0)
    run = build_run(load_model(random_init=True, seed=0, device="cpu"), images, boxes,
                    tmp_path, save_maps=False, seed=9)
    env = read_run_json(run.run_dir)["environment"]
    assert env["torch"]["num_threads"] == torch.get_num_threads()
    assert env["seeds"]["seed"] == 9
    assert env["distributions"]["torch"] == metadata.version("torch")
