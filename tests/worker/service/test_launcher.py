"""`docbatch worker --gpus`: which processes start, pinned to which GPUs."""
import pytest

from worker.service.launcher import WorkerSpec, plan_workers


def test_auto_uses_every_gpu_or_falls_back_to_cpu():
    assert plan_workers("auto", 2, "h") == [WorkerSpec("infer", "gpu0@h", "0"), WorkerSpec("infer", "gpu1@h", "1"),
                                            WorkerSpec("prepare", "prepare@h", "")]
    assert plan_workers("auto", 0, "h", with_prepare=False) == [WorkerSpec("infer", "cpu@h", "")]


def test_listed_gpus_get_a_process_each_and_a_group_shares_one():
    assert [s.cuda_visible_devices for s in plan_workers("1,3", 4, "h", with_prepare=False)] == ["1", "3"]
    # a group is one process that sees all its GPUs: vLLM's tensor parallelism over them
    assert plan_workers("0,1+2+3", 4, "h", with_prepare=False) == [
        WorkerSpec("infer", "gpu0@h", "0"), WorkerSpec("infer", "gpu1+2+3@h", "1,2,3")]


def test_none_starts_the_prepare_worker_alone():
    assert plan_workers("none", 2, "h") == [WorkerSpec("prepare", "prepare@h", "")]
    with pytest.raises(ValueError, match="no worker to start"):
        plan_workers("none", 2, "h", with_prepare=False)


@pytest.mark.parametrize("spec, num_gpus, message", [
    ("all", 0, "no GPU found"), ("2", 2, "GPU 2 does not exist"), ("0,,1", 2, "expected all, cpu"),
    ("x", 1, "GPU x does not exist")])
def test_bad_gpu_specs_are_explained(spec, num_gpus, message):
    with pytest.raises(ValueError, match=message):
        plan_workers(spec, num_gpus, "h")


def test_a_worker_started_by_celerys_command_line_takes_its_role_from_its_queue():
    from worker.service.standalone import role_for_queues

    assert role_for_queues(["infer"]) == "infer" and role_for_queues(["prepare"]) == "prepare"
    with pytest.raises(ValueError, match="exactly one of the queues infer and prepare"):
        role_for_queues(["infer", "prepare"])
