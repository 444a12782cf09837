"""``nsa-flex`` / ``python -m nsa_flex``: draw, check and demo mask expressions from the command line.

Subcommands::

    nsa-flex show  "causal() & sliding_window(64) | global_tokens(4)" --q-len 256 [--text] [--out mask.png]
    nsa-flex check "causal() & sliding_window(64)" [--examples 8]
    nsa-flex demo
    nsa-flex train [--attn nsa|dense|window] [--context 1024] [--steps 2000] ... (examples/train_lm.py)
    nsa-flex bench {nsa,decode,decode_sweep,train_lm,block_mask,block_topk,train_toy,peak_memory} [ARGS]
        (python -m bench.NAME)

A mask expression is parsed *safely*, never ``eval``-ed: :func:`parse_mask` walks its syntax tree and accepts
only calls of the mask generators of :mod:`nsa_flex.masks` that take plain values (``causal``,
``sliding_window``, ... -- see :func:`mask_generators`), with int/float/str/bool/None constants, negative
numbers and lists of ints as arguments, combined with ``&``, ``|``, ``~`` and parentheses.

Exit status: 0 on success, 1 when ``check``/``demo`` find a mismatch with dense attention, 2 for a bad
command line, expression or size (with a one-line ``nsa-flex[ COMMAND]: error: ...`` on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import random
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from . import __version__, masks
from ._checks import seed as check_seed
from .masks import Mask

PROG = "nsa-flex"
# Generators that return a Mask but cannot be written as an expression (they need tensors or callables);
# the annotation-based filter in `mask_generators` excludes them anyway, this list is a second guard.
_NOT_EXPRESSIBLE = frozenset(
    {"as_mask", "block_mask_from_indices", "num_compressed_blocks", "fine_selection", "document", "block_layout"}
)
_MAX_EXPR_CHARS = 10_000
_MAX_DEPTH = 100  # syntax-tree levels: "causal() & (sliding_window(64) | global_tokens(4))" has 6
# Largest B*H*Q*KV that `show` draws and `check` tests: both materialize the dense mask (and torch's eager CPU
# BlockMask, or dense attention's scores) on the CPU, so a typo such as --q-len 100000 must not allocate 40 GB.
MAX_PAIRS = 1 << 26
# Text rendering: the mask panel is at most this many characters wide / high (terminal cells are ~2:1).
_TEXT_COLS = 64
_TEXT_ROWS = 32
_SHADES = " ░▒▓█"  # none, some (three levels), all allowed
_SCALARS = (int, float, str, bool)


class ExpressionError(ValueError):
    """A mask expression that is not allowed, or whose generator rejected its arguments. One line."""


class CLIError(Exception):
    """A bad command line or input, reported as ``PROG: error: <message>`` (one line) with exit status 2.

    Raised by the CLI and by the example scripts, whose ``main`` reports it under their own ``PROG``."""


class ArgParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line, ``PROG: error: <message>`` on stderr, and
    exit status 2, without the usage block (``--help`` still prints it). The parser of the CLI, its
    subcommands, the examples and the bench scripts, so that every command line fails the same way."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def report_errors(prog: str, run: Callable[[], object]) -> int:
    """Run a command (``run()``): its int status, else 0; a :class:`CLIError` becomes one line
    ``prog: error: <message>`` on stderr and status 2. The entry point of the CLI and of the examples."""
    try:
        status = run()
    except CLIError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


def require(cond: bool, message: str) -> None:
    """A command line's check: :class:`CLIError` with ``message`` unless ``cond``."""
    if not cond:
        raise CLIError(message)


def require_device(device: Optional[str], flag: str = "--device") -> None:
    """``device`` (the value of ``flag``; None: the script picks) is cpu, or cuda / cuda:N on a machine with
    CUDA; else a one-line CLIError."""
    if device is None:
        return
    require(device in ("cpu", "cuda") or device.startswith("cuda:"), f"{flag} must be cpu or cuda, got {device!r}")
    require(device == "cpu" or torch.cuda.is_available(), f"{flag} {device}: CUDA is not available")


def load_checkpoint(path: Union[str, Path], flag: str) -> Any:
    """``torch.load`` onto the CPU of a file the command line names with ``flag``, ``weights_only`` (tensors and
    plain containers, no code runs). A missing file or one that is not such a checkpoint is a one-line CLIError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CLIError(f"{flag}: cannot read {str(path)!r}: {err.strerror or err}") from None
    except Exception as err:  # torch.load fails on a non-checkpoint with anything from KeyError to RuntimeError
        raise CLIError(f"{flag}: {str(path)!r} is not a checkpoint torch.load(weights_only=True) can read "
                       f"({type(err).__name__})") from None


def model_from_checkpoint(path: Union[str, Path], flag: str) -> tuple[Any, dict]:
    """``(TransformerLM, its config)`` rebuilt from a ``{"config": TransformerLM kwargs, "model": state_dict}``
    checkpoint (``examples/train_lm.py`` writes them) that the command line names with ``flag``; a file that is
    not one, or whose config or weights do not fit, is a one-line CLIError."""
    from .modules import TransformerLM

    state = load_checkpoint(path, flag)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        keys = list(state)[:5] if isinstance(state, dict) else None
        raise CLIError(f"{flag}: {str(path)!r}: expected a dict with 'config' (TransformerLM kwargs) and 'model' "
                       f"(state_dict), got {type(state).__name__} (keys {keys})")
    try:
        model = TransformerLM(**state["config"])
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as err:  # a config or state dict this model cannot take
        detail = " ".join(str(err).split())  # load_state_dict lists every missing key: one line, cut short
        raise CLIError(f"{flag}: {str(path)!r} does not fit a TransformerLM: {type(err).__name__}: "
                       f"{detail[:200]}") from None
    return model, dict(state["config"])


def make_dir(path: Union[str, Path], flag: str) -> Path:
    """Create the output directory (and its parents) the command line names with ``flag``; a one-line CLIError
    when it cannot be (a file in the way, no permission)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CLIError(f"{flag}: {str(path)!r} exists and is not a directory") from None
    except OSError as err:
        raise CLIError(f"{flag}: cannot create the directory {str(path)!r}: {err.strerror or err}") from None
    return path


# ---------------------------------------------------------------------------------------------------------
# The whitelist and the safe expression parser
# ---------------------------------------------------------------------------------------------------------
def _admits_literal(tp: Any) -> bool:
    """Whether a parameter annotated ``tp`` can receive a literal an expression may contain."""
    if tp is inspect.Parameter.empty or tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return any(_admits_literal(arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return True
    if origin in (list, tuple, Sequence, typing.Sequence):
        return all(a is Ellipsis or _admits_literal(a) for a in typing.get_args(tp))
    return isinstance(tp, type) and issubclass(tp, _SCALARS)


def _is_expressible_generator(fn: Any) -> bool:
    """A public function annotated ``-> Mask`` whose required parameters can all take literals."""
    if not inspect.isfunction(fn):
        return False
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation we cannot resolve: do not guess, leave the function out
        return False
    ret = hints.get("return")
    if not (isinstance(ret, type) and issubclass(ret, Mask)):
        return False
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.default is not param.empty:
            continue
        if not _admits_literal(hints.get(param.name, inspect.Parameter.empty)):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _generators() -> tuple[tuple[str, Callable[..., Mask]], ...]:
    names = getattr(masks, "__all__", None) or [n for n in dir(masks) if not n.startswith("_")]
    found = []
    for name in sorted(names):
        fn = getattr(masks, name, None)
        if name.startswith("_") or name in _NOT_EXPRESSIBLE or inspect.isclass(fn):
            continue
        if _is_expressible_generator(fn):
            found.append((name, fn))
    return tuple(found)


def mask_generators() -> dict[str, Callable[..., Mask]]:
    """The names an expression may call: public functions of :mod:`nsa_flex.masks` that return a
    :class:`~nsa_flex.masks.Mask` and need no tensor or callable argument (``causal``, ``sliding_window``,
    ...). Computed from the module, so new generators appear here without touching the CLI."""
    return dict(_generators())


_NODE_WORDS = {
    ast.Attribute: "attribute access",
    ast.Lambda: "lambda",
    ast.Subscript: "subscripting",
    ast.Compare: "comparison",
    ast.BoolOp: "'and'/'or'",
    ast.IfExp: "conditional expression",
    ast.NamedExpr: "assignment expression",
    ast.ListComp: "comprehension",
    ast.SetComp: "comprehension",
    ast.DictComp: "comprehension",
    ast.GeneratorExp: "generator expression",
    ast.JoinedStr: "f-string",
    ast.Starred: "*unpacking",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}
_OPERATOR_SYMBOLS = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**",
    ast.LShift: "<<", ast.RShift: ">>", ast.BitXor: "^", ast.MatMult: "@", ast.Not: "not", ast.UAdd: "+",
    ast.USub: "-",
}


def _describe(node: ast.AST) -> str:
    return _NODE_WORDS.get(type(node), f"{type(node).__name__} syntax")


def _snippet(node: ast.AST, limit: int = 40) -> str:
    text = ast.unparse(node)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_mask(expr: str) -> Mask:
    """Build the :class:`~nsa_flex.masks.Mask` an expression such as
    ``"causal() & sliding_window(64) | global_tokens(4)"`` describes, without ``eval``.

    Allowed: calls of :func:`mask_generators` names; arguments that are int/float/str/bool/None constants,
    negative numbers or lists/tuples of ints; ``&``, ``|``, ``~`` and parentheses.
    Raises :class:`ExpressionError` (a ``ValueError``) with a one-line message for anything else, and for
    a generator that rejects its arguments.
    """
    if not isinstance(expr, str):
        raise TypeError(f"expr must be a str, got {type(expr).__name__}")
    if len(expr) > _MAX_EXPR_CHARS:
        raise ExpressionError(f"expression too long ({len(expr)} characters, limit {_MAX_EXPR_CHARS})")
    if not expr.strip():
        raise ExpressionError("empty mask expression (try 'causal()')")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as err:
        col = f" at column {err.offset}" if err.offset else ""
        raise ExpressionError(f"invalid mask expression {expr!r}: {err.msg}{col}") from None
    except (RecursionError, MemoryError, ValueError) as err:  # absurd nesting / NUL bytes
        raise ExpressionError(f"invalid mask expression: {type(err).__name__}") from None
    depth = _depth(tree)
    if depth > _MAX_DEPTH:  # evaluating, printing or drawing such a mask would exhaust Python's stack later
        raise ExpressionError(f"mask expression is nested too deeply ({depth} levels, limit {_MAX_DEPTH})")
    return _mask_node(tree.body)


def _depth(tree: ast.AST) -> int:
    """The syntax tree's depth, walked without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _one_line(err: BaseException) -> str:
    """The error's message with all whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(err).split())


def _unknown(name: str) -> ExpressionError:
    known = ", ".join(mask_generators())
    return ExpressionError(f"unknown mask {name!r} (known: {known})")


def _mask_node(node: ast.AST) -> Mask:
    """Evaluate a node that must produce a Mask."""
    if isinstance(node, ast.BinOp):
        if not isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            symbol = _OPERATOR_SYMBOLS.get(type(node.op), type(node.op).__name__)
            raise ExpressionError(f"unsupported operator {symbol!r} in {_snippet(node)!r} (masks combine with &, |, ~)")
        left, right = _mask_node(node.left), _mask_node(node.right)
        try:
            return left & right if isinstance(node.op, ast.BitAnd) else left | right
        except (ValueError, TypeError) as err:
            raise ExpressionError(f"cannot combine {left!r} and {right!r}: {err}") from None
    if isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, ast.Invert):
            symbol = _OPERATOR_SYMBOLS.get(type(node.op), type(node.op).__name__)
            raise ExpressionError(f"unsupported operator {symbol!r} in {_snippet(node)!r} (masks combine with &, |, ~)")
        return ~_mask_node(node.operand)
    if isinstance(node, ast.Call):
        return _call_node(node)
    if isinstance(node, ast.Name):
        if node.id in mask_generators():
            raise ExpressionError(f"{node.id!r} is a mask generator: call it, e.g. {node.id}(...)")
        raise _unknown(node.id)
    if isinstance(node, ast.Constant):
        raise ExpressionError(f"expected a mask, got the constant {_snippet(node)!r} (e.g. causal())")
    hint = " (masks combine with &, |, ~)" if isinstance(node, (ast.BoolOp, ast.Compare)) else ""
    raise ExpressionError(f"{_describe(node)} is not allowed in a mask expression: {_snippet(node)!r}{hint}")


def _call_node(node: ast.Call) -> Mask:
    if not isinstance(node.func, ast.Name):
        raise ExpressionError(
            f"{_describe(node.func)} is not allowed in a mask expression: {_snippet(node.func)!r} "
            f"(only calls of mask generators such as causal())"
        )
    name = node.func.id
    generators = mask_generators()
    if name not in generators:
        raise _unknown(name)
    args = [_literal(arg, name, f"argument {i + 1}") for i, arg in enumerate(node.args)]
    kwargs: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ExpressionError(f"**unpacking is not allowed in a mask expression: {_snippet(node)!r}")
        kwargs[kw.arg] = _literal(kw.value, name, f"argument {kw.arg!r}")
    try:
        _check_seq_len(generators[name], args, kwargs)
        result = generators[name](*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise ExpressionError(f"{_snippet(node, 60)}: {_one_line(err)}") from None
    except Exception as err:  # e.g. device="cuda" without CUDA: still the expression's fault, still one line
        raise ExpressionError(f"{_snippet(node, 60)}: {type(err).__name__}: {_one_line(err)}") from None
    if not isinstance(result, Mask):  # pragma: no cover - the whitelist only holds functions annotated -> Mask
        raise ExpressionError(f"{name}(...) returned {type(result).__name__}, not a Mask")
    return result


def _check_seq_len(generator: Callable[..., Mask], args: list, kwargs: dict) -> None:
    """ValueError for a block layout (a generator taking ``seq_len``) too long to ever draw or check here: its
    layout is built when it is called, in memory quadratic in ``seq_len / block_size``, before any size check."""
    try:
        seq_len = inspect.signature(generator).bind_partial(*args, **kwargs).arguments.get("seq_len")
    except TypeError:
        return  # the call itself will say what is wrong with its arguments
    if isinstance(seq_len, int) and seq_len * seq_len > MAX_PAIRS:
        raise ValueError(f"seq_len={seq_len} is too long to draw or check ({seq_len:,} x {seq_len:,} mask entries, "
                         f"limit {MAX_PAIRS:,})")


def _literal(node: ast.AST, func: str, what: str) -> Any:
    """A generator argument: a scalar constant, a signed number, or a list/tuple of ints."""
    value = _scalar(node)
    if value is not _NO_VALUE:
        return value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_scalar(elt) for elt in node.elts]
        if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
            return items if isinstance(node, ast.List) else tuple(items)
    raise ExpressionError(
        f"{what} of {func}() must be an int/float/str/bool constant or a list of ints, got {_snippet(node)!r}"
    )


_NO_VALUE = object()


def _scalar(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and (node.value is None or type(node.value) in _SCALARS):
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, (ast.USub, ast.UAdd))
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) in (int, float)
    ):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    return _NO_VALUE


# ---------------------------------------------------------------------------------------------------------
# Measuring and drawing a mask
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MaskView:
    """A mask materialized for display: its dense form, its BlockMask's block grid and their counts."""

    mask: Mask
    q_len: int
    kv_len: int
    block_size: tuple[int, int]
    dense: Tensor  # bool [B, H, Q, KV]
    blocks: Tensor  # int8 [B, H, Q blocks, KV blocks]: 0 skipped, 1 partial (mask_mod evaluated), 2 full

    @property
    def allowed(self) -> int:
        return int(self.dense.sum())

    @property
    def pairs(self) -> int:
        return self.dense.numel()

    @property
    def density(self) -> float:
        return self.allowed / self.pairs

    @property
    def full_blocks(self) -> int:
        return int((self.blocks == 2).sum())

    @property
    def partial_blocks(self) -> int:
        return int((self.blocks == 1).sum())

    @property
    def computed_blocks(self) -> int:
        return self.full_blocks + self.partial_blocks

    @property
    def block_density(self) -> float:
        return self.computed_blocks / self.blocks.numel()

    def summary(self) -> list[str]:
        """Two lines: pair density/sparsity and the BlockMask's block density/sparsity."""
        bq, bkv = self.block_size
        B, H = self.dense.shape[:2]
        over = f" over B={B}, H={H}" if B * H > 1 else ""
        return [
            f"q_len={self.q_len}, kv_len={self.kv_len}{over}: {self.allowed:,} of {self.pairs:,} query-key pairs "
            f"allowed (density {self.density:.2%}, sparsity {1 - self.density:.2%})",
            f"block_size={bq}x{bkv}: {self.computed_blocks:,} of {self.blocks.numel():,} blocks computed "
            f"({self.block_density:.2%}: {self.full_blocks:,} full, {self.partial_blocks:,} partial), "
            f"block sparsity {1 - self.block_density:.2%}",
        ]


def _scatter_blocks(num: Tensor, indices: Tensor, kv_blocks: int) -> Tensor:
    """Dense bool [B, H, Qb, KVb] from a BlockMask's (num_blocks [B, H, Qb], indices [B, H, Qb, N])."""
    n = indices.shape[-1]
    valid = torch.arange(n, device=num.device) < num.unsqueeze(-1)
    grid = torch.zeros(*indices.shape[:-1], kv_blocks + 1, dtype=torch.bool, device=num.device)
    # Invalid slots land in an extra column that is dropped afterwards.
    grid.scatter_(-1, torch.where(valid, indices.long(), kv_blocks), True)
    return grid[..., :kv_blocks]


def check_size(mask: Mask, q_len: int, kv_len: int, block_size: tuple[int, int], action: str = "draw",
               default_size: int = 1) -> None:
    """Raise ValueError if materializing ``mask`` at these lengths takes more than :data:`MAX_PAIRS` entries,
    naming what was to be done with them (``"draw"``, ``"check"``). Counted over the mask's batch and heads
    (``default_size`` each where the mask sets none: ``check``'s inputs have 2), with the lengths rounded up to
    whole blocks: torch's BlockMask build evaluates every block it covers."""
    B, H = mask.extent.batch or default_size, mask.extent.heads or default_size
    q_pad, kv_pad = (math.ceil(n / b) * b for n, b in zip((q_len, kv_len), block_size))
    entries = B * H * q_pad * kv_pad
    if entries > MAX_PAIRS:
        padded = "" if (q_pad, kv_pad) == (q_len, kv_len) else f", in whole blocks {q_pad} x {kv_pad}"
        raise ValueError(
            f"{entries:,} mask entries (B={B}, H={H}, q_len={q_len}, kv_len={kv_len}{padded}) are too many to "
            f"{action}; the limit is {MAX_PAIRS:,} (B x H x q_len x kv_len)"
        )


def view_mask(mask: Mask, q_len: int, kv_len: int, block_size: tuple[int, int] = (128, 128)) -> MaskView:
    """Materialize ``mask`` for display on CPU. Raises ValueError if it is not defined for these lengths
    or would be too large to draw (see :func:`check_size`)."""
    mask.check(q_len, kv_len)
    check_size(mask, q_len, kv_len, block_size)
    dense = mask.to_dense(q_len, kv_len, device="cpu")
    bm = mask.to_block_mask(q_len, kv_len, device="cpu", block_size=block_size)
    kv_blocks = math.ceil(kv_len / block_size[1])
    partial = _scatter_blocks(bm.kv_num_blocks, bm.kv_indices, kv_blocks)
    blocks = partial.to(torch.int8)
    if bm.full_kv_num_blocks is not None:
        full = _scatter_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, kv_blocks)
        blocks = torch.where(full, torch.tensor(2, dtype=torch.int8), blocks)
    blocks = blocks.expand(dense.shape[0], dense.shape[1], *blocks.shape[2:])
    return MaskView(mask, q_len, kv_len, block_size, dense, blocks)


def _pool(grid: Tensor, rows: int, cols: int) -> Tensor:
    """Average ``grid`` [R, C] into ``rows x cols`` cells (each cell: the mean of the entries it covers)."""
    return torch.nn.functional.adaptive_avg_pool2d(grid.float()[None, None], (rows, cols))[0, 0]


def _panel_shape(n_rows: int, n_cols: int, max_cols: int, max_rows: int, aspect: float) -> tuple[int, int]:
    """Character rows/cols for an ``n_rows x n_cols`` grid; ``aspect`` = grid rows per column per char."""
    cols = min(n_cols, max_cols)  # a tall grid (q_len >> kv_len) keeps its columns and is squeezed vertically
    rows = max(1, min(n_rows, max_rows, round(cols * n_rows / n_cols / aspect)))
    return rows, cols


def _boxed(lines: list[str]) -> list[str]:
    width = max(len(line) for line in lines)
    body = ("│" + line.ljust(width) + "│" for line in lines)
    return ["┌" + "─" * width + "┐", *body, "└" + "─" * width + "┘"]


def _per_char(total: int, cells: int, singular: str, plural: str) -> str:
    """``"8 queries"``: how many grid entries one character stands for."""
    count = f"{total / cells:.3g}"
    return f"{count} {singular if count == '1' else plural}"


def render_text(view: MaskView, max_cols: int = _TEXT_COLS, max_rows: int = _TEXT_ROWS) -> str:
    """The mask (batch 0, head 0) and its block grid as unicode-block text fitting ~80 columns."""
    dense = view.dense[0, 0]
    Q, KV = dense.shape
    rows, cols = _panel_shape(Q, KV, max_cols, max_rows, aspect=2.0)
    frac = _pool(dense, rows, cols)
    levels = len(_SHADES) - 2  # shades strictly between "none" and "all"
    mask_lines = [
        "".join(
            _SHADES[0] if f <= 0 else _SHADES[-1] if f >= 1 else _SHADES[1 + min(levels - 1, int(f * levels))]
            for f in row.tolist()
        )
        for row in frac
    ]
    out = [repr(view.mask), *view.summary()]
    if view.dense.shape[0] * view.dense.shape[1] > 1:
        out.append(f"(drawing b=0, h=0 of B={view.dense.shape[0]}, H={view.dense.shape[1]})")
    out += [
        "",
        f"mask: rows = queries 0..{Q - 1}, columns = keys 0..{KV - 1}; "
        f"1 char = {_per_char(Q, rows, 'query', 'queries')} x {_per_char(KV, cols, 'key', 'keys')}",
        "      █ all allowed   ▓ ▒ ░ partly   (blank) none",
        *_boxed(mask_lines),
    ]
    blocks = view.blocks[0, 0]
    qb, kb = blocks.shape
    # One block per char pair when it fits, so square blocks look square.
    wide = 2 if 2 * kb <= max_cols and qb <= max_rows else 1
    brows, bcols = _panel_shape(qb, kb, max_cols // wide, max_rows, aspect=2.0 / wide)
    computed = _pool(blocks > 0, brows, bcols)
    full = _pool(blocks == 2, brows, bcols)
    block_lines = [
        "".join(("█" if f >= 1 else "·" if c <= 0 else "▒") * wide for c, f in zip(c_row.tolist(), f_row.tolist()))
        for c_row, f_row in zip(computed, full)
    ]
    if (brows, bcols) == (qb, kb):
        per = "1 block"
    else:
        per = f"{_per_char(qb, brows, 'block', 'blocks')} x {_per_char(kb, bcols, 'block', 'blocks')}"
    out += [
        f"BlockMask: {qb} x {kb} blocks of {view.block_size[0]}x{view.block_size[1]}; "
        f"{wide if wide > 1 else 1} char{'s' if wide > 1 else ''} = {per}",
        "      █ full (no mask_mod)   ▒ partial (mask_mod evaluated)   · skipped",
        *_boxed(block_lines),
    ]
    return "\n".join(out)


def save_png(view: MaskView, path: str, max_pixels: int = 1024) -> None:
    """Draw the mask (batch 0, head 0) with its block grid overlaid, and the block grid beside it, to a PNG.

    Needs matplotlib (``pip install "nsa_flex[plot]"``); raises CLIError without it. ``path`` should end in
    ``.png`` (:func:`png_path` checks that on the command line): matplotlib picks the format by the suffix.
    """
    try:
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise CLIError("--out needs matplotlib: pip install matplotlib (or the 'plot' extra)") from None
    dense = view.dense[0, 0]
    Q, KV = dense.shape
    image = _pool(dense, min(Q, max_pixels), min(KV, max_pixels)).numpy()
    blocks = view.blocks[0, 0].numpy()
    bq, bkv = view.block_size
    extent = (0, KV, Q, 0)  # token coordinates, origin top-left like a matrix

    fig = Figure(figsize=(12, 6.4), layout="constrained")
    ax_mask, ax_blocks = fig.subplots(1, 2)
    ax_mask.imshow(image, cmap="Blues", vmin=0, vmax=1, extent=extent, interpolation="nearest", aspect="auto")
    ax_mask.set_title("mask (blue = may attend), BlockMask grid overlaid", fontsize=10)
    # Overlay: block boundaries, and skipped blocks hatched.
    if blocks.shape[0] <= 128 and blocks.shape[1] <= 128:
        for x in range(bkv, KV, bkv):
            ax_mask.axvline(x, color="0.6", linewidth=0.5)
        for y in range(bq, Q, bq):
            ax_mask.axhline(y, color="0.6", linewidth=0.5)
    ax_blocks.imshow(
        blocks,
        cmap=ListedColormap(["#f2f2f2", "#f5a623", "#1f4e9c"]),
        vmin=0,
        vmax=2,
        extent=(0, blocks.shape[1] * bkv, blocks.shape[0] * bq, 0),
        interpolation="nearest",
        aspect="auto",
    )
    ax_blocks.set_title(f"BlockMask blocks ({bq}x{bkv} tokens)", fontsize=10)
    ax_blocks.legend(
        handles=[
            Patch(color="#1f4e9c", label=f"full ({view.full_blocks})"),
            Patch(color="#f5a623", label=f"partial ({view.partial_blocks})"),
            Patch(facecolor="#f2f2f2", edgecolor="0.5",
                  label=f"skipped ({view.blocks.numel() - view.computed_blocks})"),
        ],
        loc="upper right",
        fontsize=8,
    )
    for ax in (ax_mask, ax_blocks):
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.suptitle(
        f"{view.mask!r}\nq_len={Q}, kv_len={KV}: density {view.density:.2%} (sparsity {1 - view.density:.2%}); "
        f"blocks computed {view.block_density:.2%} (block sparsity {1 - view.block_density:.2%})",
        fontsize=10,
    )
    try:
        fig.savefig(path, dpi=100)
    except OSError as err:
        raise CLIError(f"cannot write {path}: {err.strerror or err}") from None


# ---------------------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------------------
def positive_arg(text: str) -> int:
    """An argparse type: a positive int (sizes, lengths, counts), else a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    try:
        return check_seed("--seed", value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--seed ")) from None


def _block_size(text: str) -> tuple[int, int]:
    """``"64"`` -> (64, 64); ``"128,64"`` -> (128, 64) (query block, key block)."""
    try:
        sizes = [int(part) for part in text.replace("x", ",").split(",")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected B or Q_BLOCK,KV_BLOCK of positive integers, got {text!r}")
    return (sizes[0], sizes[-1])


def png_path(text: str) -> str:
    """An argparse type: a file name ending in ``.png``, checked before any work is done."""
    if Path(text).suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"expected a file name ending in .png, got {text!r}")
    return text


def _mask_arg(expr: str) -> Mask:
    try:
        return parse_mask(expr)
    except ExpressionError as err:
        raise CLIError(str(err)) from None


def cmd_show(args: argparse.Namespace) -> int:
    mask = _mask_arg(args.expr)
    kv_len = args.kv_len or args.q_len
    try:
        view = view_mask(mask, args.q_len, kv_len, args.block_size)
    except (ValueError, TypeError) as err:
        raise CLIError(_one_line(err)) from None
    except Exception as err:  # e.g. a mask holding tensors on a device the CPU drawing cannot read
        raise CLIError(f"cannot draw {mask!r}: {type(err).__name__}: {_one_line(err)}") from None
    if args.text or not args.out:
        print(render_text(view))
    else:
        print(repr(view.mask))
        print("\n".join(view.summary()))
    if args.out:
        save_png(view, args.out)
        print(f"wrote {args.out}")
    return 0


_CHECK_BLOCK_SIZES = (16, 32, 64, 128)


def _draw_length(rng: random.Random, maximum: int, block: int) -> int:
    """A length in [1, maximum], biased towards edge cases: tiny, and around multiples of the block size."""
    kind = rng.random()
    if kind < 0.2:
        return rng.randint(1, min(maximum, 8))
    if kind < 0.5 and maximum > block:
        n = rng.randint(1, maximum // block) * block + rng.choice((-1, 0, 1))
        return min(max(n, 1), maximum)
    return rng.randint(1, maximum)


@dataclasses.dataclass(frozen=True)
class CheckCase:
    q_len: int
    kv_len: int
    block_size: tuple[int, int]
    seed: int

    def describe(self) -> str:
        bs = f"{self.block_size[0]}" if self.block_size[0] == self.block_size[1] else "{},{}".format(*self.block_size)
        return f"q_len={self.q_len:<5} kv_len={self.kv_len:<5} block_size={bs:<7} seed={self.seed:<10}"


def check_cases(
    q_len: int, kv_len: Optional[int], examples: int, block_size: Optional[tuple[int, int]], seed: int
) -> list[CheckCase]:
    """The cases ``check`` runs: the given lengths first, then random ones (kv_len = q_len when not given)."""
    rng = random.Random(seed)
    first_block = block_size or (128, 128)
    cases = [CheckCase(q_len, kv_len or q_len, first_block, seed)]
    while len(cases) < examples:
        if block_size is not None:
            bs = block_size
        elif rng.random() < 0.25:
            bs = (rng.choice(_CHECK_BLOCK_SIZES), rng.choice(_CHECK_BLOCK_SIZES))
        else:
            bs = (rng.choice(_CHECK_BLOCK_SIZES),) * 2
        q = _draw_length(rng, q_len, bs[0])
        kv = q if kv_len is None else _draw_length(rng, kv_len, bs[1])
        cases.append(CheckCase(q, kv, bs, rng.randrange(2**31)))
    return cases


def run_checks(
    mask: Mask, cases: Sequence[CheckCase], dtype: torch.dtype = torch.float32, out: Optional[typing.TextIO] = None
) -> tuple[int, int, int]:
    """Run ``assert_matches_dense`` for each case, printing one line each. Returns (passed, failed, skipped)."""
    from .testing import TOLERANCE, assert_matches_dense

    out = out or sys.stdout
    passed = failed = skipped = 0
    worst = 0.0
    start = time.perf_counter()
    for case in cases:
        try:
            mask.check(case.q_len, case.kv_len)
        except ValueError as err:
            skipped += 1
            print(f"  skip {case.describe()} mask not defined here: {err}", file=out)
            continue
        try:
            err_max = assert_matches_dense(
                mask, case.q_len, case.kv_len, block_size=case.block_size, dtype=dtype, seed=case.seed
            )
        except AssertionError as err:
            failed += 1
            print(f"  FAIL {case.describe()} {_one_line(err)}", file=out)
            continue
        except Exception as err:  # a mask_mod that flex_attention cannot run is a failure too
            failed += 1
            print(f"  FAIL {case.describe()} {type(err).__name__}: {_one_line(err)}", file=out)
            continue
        passed += 1
        worst = max(worst, err_max)
        print(f"  ok   {case.describe()} max|err|={err_max:.2e}", file=out)
    dtype_name = str(dtype).replace("torch.", "")
    print(
        f"{len(cases)} cases: {passed} passed, {failed} failed, {skipped} skipped "
        f"(max |error| {worst:.2e}, atol {TOLERANCE[dtype]:g}, {dtype_name} vs float64 dense) "
        f"in {time.perf_counter() - start:.1f}s",
        file=out,
    )
    return passed, failed, skipped


def cmd_check(args: argparse.Namespace) -> int:
    from .testing.assertions import DEFAULT_SIZE

    mask = _mask_arg(args.expr)
    cases = check_cases(args.q_len, args.kv_len, args.examples, args.block_size, args.seed)
    first = cases[0]  # the largest: later ones are no longer, in its blocks or in smaller ones dividing them
    try:
        mask.check(first.q_len, first.kv_len)
        check_size(mask, first.q_len, first.kv_len, first.block_size, "check", DEFAULT_SIZE)
    except ValueError as err:
        raise CLIError(_one_line(err)) from None
    dtype = getattr(torch, args.dtype)
    print(f"checking {mask!r}: flex_attention vs float64 dense attention")
    passed, failed, _ = run_checks(mask, cases, dtype)
    if failed:
        return 1
    if not passed:
        raise CLIError(f"no case could run: {mask!r} is not defined for any of the drawn lengths")
    return 0


DEMO_EXPR = "causal() & (sliding_window(64) | global_tokens(4))"


def _demo_nsa() -> bool:
    """Run NSA on a tiny input against the float64 reference. Returns False on mismatch."""
    from . import functional, testing

    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D = 1, 4, 2, 128, 16
    q = torch.randn(B, Hq, T, D, generator=gen)
    k, v = (torch.randn(B, Hkv, T, D, generator=gen) for _ in range(2))
    gates = torch.rand(B, Hq, T, 3, generator=gen)
    config = dict(
        compress_block_size=16, compress_stride=8, selection_block_size=16, num_selected=4, num_initial=1,
        num_local=2, window_size=32,
    )
    print(f"q {list(q.shape)}, k/v {list(k.shape)} (GQA), gates {list(gates.shape)}; {config}")
    start = time.perf_counter()
    with torch.no_grad():
        out = functional.nsa_attention(q, k, v, gates, **config)
        ref = testing.reference_nsa(q, k, v, gates, **config)
    err = float((out.double() - ref.double()).abs().max())
    atol = testing.TOLERANCE[torch.float32] * 10
    verdict = "ok" if err <= atol else "MISMATCH"
    print(f"nsa_attention vs reference_nsa: max |error| {err:.2e} (atol {atol:g}) {verdict} "
          f"[{time.perf_counter() - start:.1f}s]")
    return err <= atol


def cmd_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    print(f"== 1. compose a mask from an expression (parsed safely, no eval)\n   {DEMO_EXPR}\n")
    mask = parse_mask(DEMO_EXPR)
    view = view_mask(mask, 256, 256, (32, 32))
    print(render_text(view))
    print("\n== 2. check flex_attention with its BlockMask against float64 dense attention")
    _, failed, _ = run_checks(mask, check_cases(256, None, 5, None, seed=0))
    print("\n== 3. what the sparsity buys at a realistic length (T=4096, 128x128 blocks)")
    big = view_mask(mask, 4096, 4096, (128, 128))
    print("\n".join(big.summary()))
    print("\n== 4. Native Sparse Attention on a tiny input vs the float64 reference")
    nsa_ok = _demo_nsa()
    ok = not failed and nsa_ok
    print(f"\ndemo {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.1f}s. Next: nsa-flex show --help")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(mask_generators())
    parser = ArgParser(
        prog=PROG,
        description="Draw, check and demo composable FlexAttention sparse-attention masks.",
        epilog=f"EXPR combines mask generators with & | ~ and parentheses; generators: {names}.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    show = sub.add_parser("show", help="draw a mask expression as text or PNG, with its density and block sparsity")
    show.add_argument("expr", metavar="EXPR", help='mask expression, e.g. "causal() & sliding_window(64)"')
    show.add_argument("--q-len", type=positive_arg, default=256, help="number of queries (default 256)")
    show.add_argument("--kv-len", type=positive_arg, default=None, help="number of keys (default: q-len)")
    show.add_argument("--block-size", type=_block_size, default=(128, 128), metavar="B[,KV_B]",
                      help="BlockMask block size (default 128)")
    show.add_argument("--out", type=png_path, metavar="FILE.png", help="write a PNG (needs matplotlib)")
    show.add_argument("--text", action="store_true", help="print as text (the default unless --out is given)")
    show.set_defaults(func=cmd_show)

    check = sub.add_parser("check", help="property-test a mask expression: flex_attention vs float64 dense")
    check.add_argument("expr", metavar="EXPR", help="mask expression")
    check.add_argument("--q-len", type=positive_arg, default=256,
                       help="the first case's number of queries and the maximum for random ones (default 256)")
    check.add_argument("--kv-len", type=positive_arg, default=None,
                       help="same for keys; default: every case uses kv_len = q_len")
    check.add_argument("--examples", type=positive_arg, default=8, help="number of cases (default 8)")
    check.add_argument("--block-size", type=_block_size, default=None, metavar="B[,KV_B]",
                       help="fixed BlockMask block size (default: 128 first, then random 16..128)")
    check.add_argument("--seed", type=_seed, default=0, help="seed for lengths, block sizes and inputs (default 0)")
    check.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="flex compute dtype")
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="a few-second tour on CPU: compose, draw, check, NSA")
    demo.set_defaults(func=cmd_demo)

    # Listed for --help only: `main` forwards `train ...` and `bench ...` before parsing.
    sub.add_parser("train", add_help=False,
                   help="train a byte-level LM with NSA/dense/window attention (examples/train_lm.py; "
                        "nsa-flex train --help)")
    sub.add_parser("bench", add_help=False,
                   help=f"run a benchmark of the checkout's bench/ ({', '.join(BENCHMARKS)}; "
                        f"nsa-flex bench NAME --help). {BENCH_NOTES}")
    return parser


CHECKOUT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = CHECKOUT / "examples" / "train_lm.py"
BENCHMARKS = ("nsa", "decode", "decode_sweep", "train_lm", "block_mask", "block_topk", "train_toy", "peak_memory")
BENCH_NOTES = ("--smoke is a quick CPU check, and the results go to bench/results/ under the current directory "
               "unless --out DIR (all but decode_sweep, which only prints)")


def _run_main(call) -> int:
    """Run a script's ``main`` (``call()``); its ``SystemExit`` (``--help``, argparse errors, "needs CUDA")
    becomes the status, a message one line on stderr with status 2."""
    try:
        status = call()
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        raise CLIError(str(exit_.code)) from None
    return status if isinstance(status, int) else 0


def cmd_train(argv: Sequence[str]) -> int:
    """``nsa-flex train ARGS``: run ``examples/train_lm.py``'s ``main(ARGS)`` (a source checkout has it)."""
    import importlib.util

    if not TRAIN_SCRIPT.is_file():
        raise CLIError(f"train needs examples/train_lm.py of a source checkout (not found at {TRAIN_SCRIPT})")
    spec = importlib.util.spec_from_file_location("nsa_flex_examples_train_lm", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return _run_main(lambda: module.main(list(argv), prog=f"{PROG} train"))


def cmd_bench(argv: Sequence[str]) -> int:
    """``nsa-flex bench NAME ARGS``: ``python -m bench.NAME ARGS`` of the source checkout (not installed)."""
    import importlib

    if not argv:
        raise CLIError(f"bench needs a benchmark name, one of {', '.join(BENCHMARKS)}")
    if argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} bench {{{','.join(BENCHMARKS)}}} [ARGS]  ({PROG} bench NAME --help lists ARGS)\n"
              f"{BENCH_NOTES}.")
        return 0
    name = argv[0]
    if name not in BENCHMARKS:
        raise CLIError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    if not (CHECKOUT / "bench" / f"{name}.py").is_file():
        raise CLIError(f"bench needs the bench/ folder of a source checkout (not found in {CHECKOUT})")
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    module = importlib.import_module(f"bench.{name}")
    sys_argv = sys.argv
    sys.argv = [f"{PROG} bench {name}", *argv[1:]]  # argparse's usage line names the command
    try:
        return _run_main(lambda: module.main(argv[1:]))
    finally:
        sys.argv = sys_argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 mismatch found, 2 bad command line or expression)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    forwarded = {"train": cmd_train, "bench": cmd_bench}
    if argv[:1] and argv[0] in forwarded:
        return report_errors(PROG, lambda: forwarded[argv[0]](argv[1:]))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (status 2) and --help/--version (status 0)
        return exit_.code if isinstance(exit_.code, int) else 2
    return report_errors(PROG, lambda: args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
