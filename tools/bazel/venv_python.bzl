"""Registers the project's virtualenv interpreter as Bazel's Python toolchain.

Bazel 4 runs `py_binary`/`py_test` targets with the interpreter of the
registered Python toolchain. The project's tests need TensorFlow, Keras and
pytest, which live in the virtualenv that `scripts/setup.sh` creates at
`<workspace>/.venv`. A `py_runtime` needs an absolute `interpreter_path`, and
the absolute path differs for every clone, so this repository rule computes it
when Bazel fetches the repository (the output base is keyed on the workspace
path, so a clone in another folder gets its own). Set `KFT_BAZEL_PYTHON` to an
absolute interpreter path to use another Python.
"""

def _venv_python_impl(rctx):
    workspace_dir = rctx.path(Label("@//:WORKSPACE")).dirname
    python = rctx.os.environ.get("KFT_BAZEL_PYTHON", "")
    if not python:
        python = "%s/.venv/bin/python3" % workspace_dir
    if not python.startswith("/"):
        fail("KFT_BAZEL_PYTHON must be an absolute path. Received: %s" % python)
    if not rctx.path(python).exists:
        # Not fatal: `bazel query` and `bazel build` do not run Python. The
        # test runner reports the missing interpreter clearly.
        print("WARNING: %s does not exist; run `bash scripts/setup.sh` before `bazel test`." % python)
    rctx.file("WORKSPACE", 'workspace(name = "%s")\n' % rctx.name)
    rctx.file("BUILD", """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

package(default_visibility = ["//visibility:public"])

py_runtime(
    name = "venv_py3",
    interpreter_path = "{python}",
    python_version = "PY3",
    # The launcher stub needs only the standard library; it then runs the
    # test with `interpreter_path`.
    stub_shebang = "#!/usr/bin/env python3",
)

py_runtime_pair(
    name = "venv_runtime_pair",
    py3_runtime = ":venv_py3",
)

toolchain(
    name = "toolchain",
    toolchain = ":venv_runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
""".format(python = python))

venv_python = repository_rule(
    implementation = _venv_python_impl,
    environ = ["KFT_BAZEL_PYTHON"],
    local = True,
)
