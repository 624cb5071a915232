"""The documentation's examples run: every ``>>>`` example in the package's docstrings (doctest) and
every Python block of README.md and docs/*.md.

Docstrings: every module of ``sparseattn`` and ``sparseattn.triton_kernels`` (pkgutil), through
``doctest.DocTestFinder`` and a runner with ELLIPSIS and NORMALIZE_WHITESPACE; one test per
docstring. An example that cannot run here carries ``# <reason>  # doctest: +SKIP`` on its first
line: the reason is required, and a docstring whose examples are all skipped is reported as a
skipped test with that reason. Modules that are not imported at all are listed in SKIP_MODULES,
each with its reason, and show as skipped tests too.

README.md and docs/*.md: one test per fenced block. A ```python block runs in a fresh namespace
(``torch`` and ``sa`` = sparseattn already there), unless the line right before it is a marker
``<!-- not run: REASON -->``; then the test is skipped with REASON (blocks marked ``needs CUDA``
run where CUDA is available). Blocks in other languages (shell, plain text) are skipped as such.
Nothing is skipped silently. Examples are kept small: the Triton kernels run interpreted here.
"""
import doctest
import importlib
import importlib.util
import pathlib
import pkgutil
import re
import traceback

import pytest
import torch

import sparseattn
import sparseattn.triton_kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]

SKIP_MODULES = {
    "sparseattn._C": "compiled CUDA extension: no Python docstrings",
    "sparseattn.triton_kernels.gate": "the compile gate: needs TRITON_INTERPRET off; tested by "
                                      "tests/triton_kernels/test_compile_gate.py",
    "sparseattn.bench.__main__": "importing it runs the benchmark (python -m sparseattn.bench)",
}
if importlib.util.find_spec("transformers") is None:   # the optional hf extra (README's test command installs it)
    SKIP_MODULES["sparseattn.integrations.transformers"] = "needs transformers: pip install -e '.[hf]'"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


# ----------------------------------------------------------------------------- docstrings
def _module_names():
    names = ["sparseattn", "sparseattn.triton_kernels"]
    for pkg in (sparseattn, sparseattn.triton_kernels):
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return sorted(set(names))


def _doctest_params():
    params = []
    finder = doctest.DocTestFinder(exclude_empty=True)
    for name in _module_names():
        if name in SKIP_MODULES:
            params.append(pytest.param(name, None, None, id=f"{name} (module skipped)"))
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - reported by its own failing test, not a collection error
            params.append(pytest.param(name, None, traceback.format_exc(), id=f"{name} (import)"))
            continue
        for test in sorted(finder.find(module, name), key=lambda t: t.name):
            if test.examples:
                params.append(pytest.param(name, test, None, id=test.name))
    return params


_SKIP_REASON = re.compile(r"#\s*([^#]*?)\s*#\s*doctest:")


def _skip_reason(example):
    m = _SKIP_REASON.search(example.source.splitlines()[0])
    return m.group(1) if m and m.group(1) else None


DOCTESTS = _doctest_params()


@pytest.mark.parametrize("module,test,import_error", DOCTESTS)
def test_docstring_examples(module, test, import_error):
    if test is None and import_error is None:
        pytest.skip(f"{module}: {SKIP_MODULES[module]}")
    if import_error is not None:
        pytest.fail(f"{module} failed to import:\n{import_error}", pytrace=False)
    skipped = [ex for ex in test.examples if ex.options.get(doctest.SKIP)]
    missing = [ex.source.splitlines()[0] for ex in skipped if _skip_reason(ex) is None]
    assert not missing, (f"{test.name}: an example skipped with no reason (write "
                         f"'# <reason>  # doctest: +SKIP'): {missing}")
    report = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(test, out=report.append)
    if result.failed:
        pytest.fail(f"{test.name}: {result.failed} of {result.attempted} examples failed\n"
                    + "".join(report), pytrace=False)
    if skipped:
        reasons = "; ".join(sorted({_skip_reason(ex) for ex in skipped}))
        pytest.skip(f"{test.name}: {len(skipped)} of {len(test.examples)} examples not run: {reasons}")


def test_docstring_examples_were_found():
    """The walk finds the package's examples (a broken walk would pass vacuously)."""
    found = {p.values[1].name for p in DOCTESTS if p.values[1] is not None}
    for name in ("sparseattn", "sparseattn.ops.attention.op.sparse_attention",
                 "sparseattn.patterns.sliding_window.SlidingWindow",
                 "sparseattn.layout.block_layout.BlockLayout"):
        assert name in found, sorted(found)


# ----------------------------------------------------------------------------- README.md, docs/*.md
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->\s*$")


def markdown_blocks(text, name="README.md"):
    """[(line of the opening fence, language, code, reason or None)] of a Markdown text; a marker
    ``<!-- not run: REASON -->`` applies to the block whose fence is on the next line."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            if _MARKER.match(lines[i]) and (i + 1 >= len(lines) or not _FENCE.match(lines[i + 1])):
                raise ValueError(f"{name}:{i + 1}: a 'not run' marker not followed by a fenced block")
            i += 1
            continue
        start, lang = i, m.group(1)
        marker = _MARKER.match(lines[i - 1]) if i else None
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise ValueError(f"{name}:{start + 1}: unclosed code block")
        blocks.append((start + 1, lang, "\n".join(lines[start + 1:i]), marker.group(1) if marker else None))
        i += 1
    return blocks


MARKDOWN = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
BLOCKS = [(name, *block) for name in MARKDOWN for block in markdown_blocks((ROOT / name).read_text(), name)]


def _needs_cuda(reason):
    return reason is not None and reason.startswith("needs CUDA")


@pytest.mark.parametrize("path,line,lang,code,reason", [
    pytest.param(*b, id=f"{b[0]}:{b[1]}-{b[2] or 'text'}",
                 marks=[pytest.mark.gpu] if _needs_cuda(b[4]) else [])
    for b in BLOCKS])
def test_markdown_block(path, line, lang, code, reason):
    """(Blocks marked ``needs CUDA`` are ``gpu`` tests: they run where CUDA is, and conftest skips
    them, with that reason, elsewhere.)"""
    where = f"{path}:{line}"
    if lang != "python":
        pytest.skip(f"{where}: a ```{lang} block is not Python ({lang or 'plain text'}): not run")
    if reason is not None:
        assert reason, f"{where}: a 'not run' marker must give its reason"
        if not _needs_cuda(reason):
            pytest.skip(f"{where}: not run: {reason}")
    namespace = {"__name__": "__markdown__", "torch": torch, "sa": sparseattn}
    # padded so that a traceback's line numbers are the file's
    exec(compile("\n" * line + code, path, "exec"), namespace)  # noqa: S102 - the docs' own example


def test_markdown_markers_are_read():
    """The rule above sees markers and non-Python blocks (so no block is skipped unnoticed)."""
    blocks = markdown_blocks("x\n<!-- not run: needs CUDA -->\n```python\n1/0\n```\n```bash\nls\n```\n"
                             "```python\nx = 1\n```")
    assert [(b[1], b[3]) for b in blocks] == [("python", "needs CUDA"), ("bash", None), ("python", None)]
    with pytest.raises(ValueError, match="not followed by a fenced block"):
        markdown_blocks("<!-- not run: stale -->\ntext\n```python\nx = 1\n```")
    assert "docs/patterns.md" in MARKDOWN
    for name in MARKDOWN:
        runs = [b for b in BLOCKS if b[0] == name and b[2] == "python" and b[4] is None]
        assert runs, f"{name}: no Python block runs"
