"""The task registry: every LRA task is registered and honours the task contract."""

import inspect

import pytest

from lra import tasks

LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")


def test_registry_holds_the_six_lra_tasks_in_paper_order():
    assert tasks.NAMES == LRA_TASKS


@pytest.mark.parametrize("name", LRA_TASKS)
def test_task_contract(name, tmp_path):
    task = tasks.get(name)
    assert task.name == name
    assert task.num_classes >= 2 and task.vocab_size >= 2
    assert task.splits == ("train", "val", "test")
    assert isinstance(task.generated, bool) and task.paired == (name == "retrieval")
    assert "data_dir" in inspect.signature(task.prepare).parameters
    assert not task.is_prepared(tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m lra.data prepare"):
        task.load("train", tmp_path)


def test_generated_tasks_are_those_without_downloads():
    generated = {name for name in LRA_TASKS if tasks.get(name).generated}
    assert generated == {"listops", "pathfinder", "pathx"}


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="pathfinder"):
        tasks.get("pathfinder-64")
