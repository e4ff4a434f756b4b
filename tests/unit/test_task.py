"""linscale.task: finding a task by name, and the errors when it cannot be found or used."""

from __future__ import annotations

import sys
import textwrap

import pytest

import linscale
from linscale.task import Task, TaskError, resolve_task
from linscale.tasks.gpt import GPTTask

GOOD_TASK = """
    import torch
    from torch import nn
    from linscale import Task

    class Helper:
        pass

    class MyTask(Task):
        def build_model(self):
            return nn.Linear(1, 1)

        def train_data(self, shard):
            return torch.utils.data.TensorDataset(torch.zeros(4, 1))

        def loss(self, model, batch):
            return model(batch[0]).mean()

    class OtherTask(MyTask):
        pass
"""


@pytest.fixture(autouse=True)
def _forget_user_modules():
    """resolve_task registers file tasks in sys.modules; drop what a test added."""
    before = set(sys.modules)
    path_before = list(sys.path)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("_linscale_user_task_", "lsunit_")):
            del sys.modules[name]
    assert sys.path == path_before, "resolve_task must leave sys.path as it found it"


def write_task(tmp_path, body: str, name: str = "my_task.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_builtin_gpt():
    assert resolve_task("gpt") is GPTTask


def test_builtin_by_full_module_spec():
    assert resolve_task("linscale.tasks.gpt:GPTTask") is GPTTask


def test_file_task(tmp_path):
    path = write_task(tmp_path, GOOD_TASK)
    cls = resolve_task(f"{path}:MyTask")
    assert cls.__name__ == "MyTask"
    assert issubclass(cls, linscale.Task)
    task = cls()
    assert task.build_model().in_features == 1
    other = resolve_task(f"{path}:OtherTask")
    assert other.__mro__[1].__name__ == "MyTask" and issubclass(other, Task)


def test_file_task_relative_path(tmp_path, monkeypatch):
    write_task(tmp_path, GOOD_TASK, "rel_task.py")
    monkeypatch.chdir(tmp_path)
    assert resolve_task("rel_task.py:MyTask").__name__ == "MyTask"


def test_file_task_imports_sibling_module(tmp_path):
    (tmp_path / "lsunit_sibling.py").write_text("WIDTH = 3\n")
    body = GOOD_TASK.replace("class Helper:", "import lsunit_sibling\n    class Helper:").replace(
        "nn.Linear(1, 1)", "nn.Linear(lsunit_sibling.WIDTH, 1)"
    )
    path = write_task(tmp_path, body)
    assert resolve_task(f"{path}:MyTask")().build_model().in_features == 3


def test_duck_typed_task_is_accepted(tmp_path):
    path = write_task(
        tmp_path,
        """
        class Duck:
            def build_model(self): ...
            def train_data(self, shard): ...
            def loss(self, model, batch): ...
        """,
    )
    assert resolve_task(f"{path}:Duck").__name__ == "Duck"


def test_module_task(tmp_path, monkeypatch):
    pkg = tmp_path / "lsunit_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text(textwrap.dedent(GOOD_TASK))
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = resolve_task("lsunit_pkg.tasks:MyTask")
    assert cls.__module__ == "lsunit_pkg.tasks"
    assert cls.__name__ == "MyTask"


def test_module_task_missing_class_lists_defined(tmp_path, monkeypatch):
    pkg = tmp_path / "lsunit_pkg2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text(textwrap.dedent(GOOD_TASK))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaskError, match="module 'lsunit_pkg2.tasks' has no class 'Missing'") as err:
        resolve_task("lsunit_pkg2.tasks:Missing")
    assert "MyTask" in str(err.value) and "OtherTask" in str(err.value)


def test_module_not_importable():
    with pytest.raises(TaskError, match="cannot import module 'lsunit_no_such_pkg.mod'"):
        resolve_task("lsunit_no_such_pkg.mod:Cls")


def test_missing_file(tmp_path):
    missing = tmp_path / "absent.py"
    with pytest.raises(TaskError, match="not found") as err:
        resolve_task(f"{missing}:MyTask")
    assert str(missing) in str(err.value)


def test_missing_class_lists_the_classes_defined(tmp_path):
    path = write_task(tmp_path, GOOD_TASK)
    with pytest.raises(TaskError, match="has no class 'MyTsak'") as err:
        resolve_task(f"{path}:MyTsak")
    msg = str(err.value)
    assert "MyTask" in msg and "OtherTask" in msg
    assert str(path) in msg


def test_missing_class_in_file_without_tasks(tmp_path):
    path = write_task(tmp_path, "X = 1\n")
    with pytest.raises(TaskError, match="has no class 'MyTask'") as err:
        resolve_task(f"{path}:MyTask")
    assert "defines" not in str(err.value)


@pytest.mark.parametrize("spec", ["foo", "my_task.py", "pkg.mod"])
def test_unknown_name_without_colon(spec):
    with pytest.raises(TaskError, match=f"unknown task '{spec}'") as err:
        resolve_task(spec)
    assert "gpt" in str(err.value)  # lists the built-ins


@pytest.mark.parametrize("spec", ["x.py:", "x.py:1bad", ":MyTask", "pkg.mod:not-an-identifier", "x.py:a.b"])
def test_malformed_spec(spec):
    with pytest.raises(TaskError, match="malformed task"):
        resolve_task(spec)


def test_file_that_fails_to_import(tmp_path):
    path = write_task(tmp_path, "import math\nraise RuntimeError('boom at import')\n")
    with pytest.raises(TaskError, match="failed to import: RuntimeError: boom at import") as err:
        resolve_task(f"{path}:MyTask")
    assert str(path) in str(err.value)


def test_file_with_syntax_error(tmp_path):
    path = write_task(tmp_path, "def broken(:\n")
    with pytest.raises(TaskError, match="failed to import: SyntaxError"):
        resolve_task(f"{path}:MyTask")


def test_class_missing_loss(tmp_path):
    path = write_task(
        tmp_path,
        """
        from torch import nn
        from linscale import Task

        class NoLoss(Task):
            def build_model(self):
                return nn.Linear(1, 1)

            def train_data(self, shard):
                return []
        """,
    )
    with pytest.raises(TaskError, match=r"must define loss \(") as err:
        resolve_task(f"{path}:NoLoss")
    assert "build_model" not in str(err.value) and "train_data" not in str(err.value)


def test_duck_typed_class_missing_methods(tmp_path):
    path = write_task(tmp_path, "class Half:\n    def loss(self, model, batch): ...\n")
    with pytest.raises(TaskError, match="must define build_model, train_data"):
        resolve_task(f"{path}:Half")


def test_name_that_is_not_a_class(tmp_path):
    path = write_task(tmp_path, "MyTask = 5\n")
    with pytest.raises(TaskError, match="is not a class"):
        resolve_task(f"{path}:MyTask")
