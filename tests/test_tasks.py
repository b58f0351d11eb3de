"""The task registry: every LRA task and every token task is registered and honours the
task contract."""

import inspect

import pytest

from lra import tasks

LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
TOKEN_TASKS = ("mqar", "in_context_recall", "fuzzy_recall", "noisy_recall",
               "selective_copying", "compression", "memorization", "induction_heads")


def test_registry_holds_the_six_lra_tasks_in_paper_order_then_the_token_tasks():
    assert tasks.NAMES == LRA_TASKS + TOKEN_TASKS


@pytest.mark.parametrize("name", TOKEN_TASKS)
def test_token_task_contract(name, tmp_path):
    """Settings with defaults, sizes from them, per-position targets, the prepare command
    named when data is missing."""
    task = tasks.get(name)
    assert task.name == name and task.token_targets and task.generated and not task.paired
    vocab_size, num_classes = tasks.sizes(task, {})
    assert vocab_size == num_classes >= 2 and task.max_targets_for({}) >= 1
    assert not task.is_prepared(tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m lra.data prepare"):
        task.load("train", tmp_path)


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
