"""`pytest_test`: a Bazel `py_test` that runs one pytest module."""

def pytest_test(name, src, deps = [], data = [], pure_python = False, tags = [], **kwargs):
    """Declares `name` as a `py_test` running pytest on the single module `src`.

    Args:
      name: target name, e.g. `test_distributions`.
      src: the pytest module, e.g. `tests/test_distributions.py`.
      deps: `py_library` targets the module imports.
      data: extra runfiles (pytest.ini and conftest.py belong in here).
      pure_python: True when the module imports neither TensorFlow nor
        Keras; such targets are `small` and tagged `pure_python`, the others
        are `medium` and tagged `tensorflow`.
      tags: extra tags.
      **kwargs: passed on to `py_test` (`size`, `timeout`, `shard_count`, ...).
    """
    kwargs.setdefault("size", "small" if pure_python else "medium")
    native.py_test(
        name = name,
        srcs = [src, "//tools/bazel:pytest_main.py"],
        main = "//tools/bazel:pytest_main.py",
        args = ["$(location %s)" % src],
        data = data,
        deps = deps,
        legacy_create_init = False,
        python_version = "PY3",
        srcs_version = "PY3",
        tags = ["pytest", "pure_python" if pure_python else "tensorflow"] + tags,
        **kwargs
    )
