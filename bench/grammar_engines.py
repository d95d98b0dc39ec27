"""Grammar engines for structured outputs: xgrammar against llguidance, on this machine's CPU.

    python bench/grammar_engines.py                # both engines, the default model's tokenizer
    python bench/grammar_engines.py --engines llguidance --repeat 3

For each engine and each case (JSON schemas, json_object, a regex, a choice, a Lark and a GBNF
grammar) it measures: the one-off tokenizer set-up, compile time (cold, then a repeat to see what
a cache saves), matcher creation, and, while feeding a known-valid output token by token (the
instance text tokenized with the model's tokenizer, each token checked against the mask before it
is accepted), the time to fill one row of the next-token bitmask and the time to accept a token.
At the end of each output it checks that EOS is allowed and what the matcher says after EOS.

It then prints: errors for bad schemas, regexes and grammars (type and message), how unsupported
JSON-schema keywords are handled, validating a schema without a tokenizer, whether compile and
mask filling release the GIL (a heartbeat loop in the main thread while the work runs in a thread
pool), batch mask filling, and the cost of applying a bitmask to float32 logits on the CPU.

Timings are printed, never asserted. Microseconds (us) unless marked ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------
# Cases: (name, kind, spec, a valid output). The output is what a model would write, with the
# usual json.dumps spacing; its tokens (from the model's tokenizer) are fed to the matcher.
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    kind: str  # json_schema | json_object | regex | choice | lark | gbnf
    spec: object  # schema dict, regex str, list of choices, grammar text
    output: str


def _person():
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.(com|org)$"},
            "verified": {"type": "boolean"},
        },
        "required": ["name", "age", "email", "verified"],
    }


def _many_fields():
    props, value = {}, {}
    for i in range(20):
        kind = ("string", "integer", "boolean", "number")[i % 4]
        props[f"field_{i:02d}"] = {"type": kind}
        value[f"field_{i:02d}"] = {"string": f"v{i}", "integer": i, "boolean": i % 3 == 0, "number": i + 0.5}[kind]
    return {"type": "object", "properties": props, "required": list(props)}, value


_MANY_SCHEMA, _MANY_VALUE = _many_fields()

SCHEMAS: list[tuple[str, dict, object]] = [
    ("person", _person(), {"name": "Ada Lovelace", "age": 36, "email": "ada@math.org", "verified": True}),
    ("nested_address", {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string"},
                    "city": {"type": "string"},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    "geo": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                            "required": ["lat", "lon"]},
                },
                "required": ["street", "city", "zip", "geo"],
            },
        },
        "required": ["id", "address"],
    }, {"id": 7, "address": {"street": "1 Main St", "city": "Springfield", "zip": "12345",
                             "geo": {"lat": 39.78, "lon": -89.65}}}),
    ("tags_min_max_items", {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
                                "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    }, {"tags": ["red", "blue"]}),
    ("enum_status", {
        "type": "object",
        "properties": {"status": {"enum": ["active", "inactive", "pending"]},
                       "priority": {"type": "integer", "enum": [1, 2, 3]}},
        "required": ["status", "priority"],
    }, {"status": "pending", "priority": 2}),
    ("numbers_bounds", {
        "type": "object",
        "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000},
                       "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                       "discount": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
        "required": ["price", "quantity", "discount"],
    }, {"price": 19.99, "quantity": 3, "discount": 0.25}),
    ("nullable", {
        "type": "object",
        "properties": {"flag": {"type": "boolean"},
                       "note": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
                       "score": {"type": ["number", "null"]}},
        "required": ["flag", "note", "score"],
    }, {"flag": False, "note": None, "score": 0.5}),
    ("defs_ref", {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                            "required": ["x", "y"]}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    }, {"start": {"x": 0, "y": 0}, "end": {"x": 3, "y": -4}}),
    ("array_of_objects", {
        "type": "array",
        "items": {"type": "object", "properties": {"id": {"type": "integer"}, "label": {"type": "string", "maxLength": 12}},
                  "required": ["id", "label"]},
        "minItems": 2, "maxItems": 4,
    }, [{"id": 1, "label": "alpha"}, {"id": 2, "label": "beta"}]),
    ("recursive_tree", {
        "$defs": {"node": {"type": "object",
                           "properties": {"name": {"type": "string"},
                                          "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                           "required": ["name", "children"]}},
        "$ref": "#/$defs/node",
    }, {"name": "root", "children": [{"name": "a", "children": []}, {"name": "b", "children": [{"name": "c", "children": []}]}]}),
    ("tool_call", {
        "type": "object",
        "properties": {"name": {"const": "get_weather"},
                       "arguments": {"type": "object",
                                     "properties": {"city": {"type": "string", "minLength": 1},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                     "required": ["city", "unit"]}},
        "required": ["name", "arguments"],
    }, {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}),
    ("optional_fields", {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "boolean"}},
        "required": ["a"],
    }, {"a": "x", "c": True}),
    ("many_fields_20", _MANY_SCHEMA, _MANY_VALUE),
    # a stress case: 150 required string fields, each with its own pattern
    ("big_150_patterns", {
        "type": "object",
        "properties": {f"f{i}": {"type": "string", "pattern": f"^[a-z]{{1,{i % 7 + 2}}}-[0-9]{{{i % 5 + 1}}}$"}
                       for i in range(150)},
        "required": [f"f{i}" for i in range(150)],
    }, {f"f{i}": "a-" + "1" * (i % 5 + 1) for i in range(150)}),
]

LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""

GBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")"
"""

CHOICES = ["positive", "negative", "neutral"]


def build_cases() -> list[Case]:
    cases = [Case(name, "json_schema", schema, json.dumps(value)) for name, schema, value in SCHEMAS]
    cases += [
        Case("json_object", "json_object", None, json.dumps({"answer": [1, 2.5, {"ok": None}], "text": "hi \"there\""})),
        Case("regex_phone", "regex", r"\d{3}-\d{4}", "555-1234"),
        Case("choice", "choice", CHOICES, "neutral"),
        Case("lark_arith", "lark", LARK, "(12+3)*4-5"),
        Case("gbnf_arith", "gbnf", GBNF, "(12+3)*4-5"),
    ]
    return cases


BAD_INPUTS = [
    ("json_schema", "type 'strin'", '{"type": "object", "properties": {"a": {"type": "strin"}}}'),
    ("json_schema", "type 5", '{"type": 5}'),
    ("json_schema", "not JSON", '{"type": "object",'),
    ("json_schema", "bad pattern", '{"type": "string", "pattern": "("}'),
    ("json_schema", "missing $ref", '{"$ref": "#/$defs/missing"}'),
    ("regex", "regex '('", "("),
    ("lark", "undefined rule", "start: foo"),
    ("gbnf", "undefined rule", "root ::= foo"),
]

UNSUPPORTED = [
    ("not", {"not": {"type": "string"}}),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
    ("if/then", {"type": "string", "if": {"minLength": 1}, "then": {"maxLength": 5}}),
    ("format: email", {"type": "string", "format": "email"}),
    ("format: bogus", {"type": "string", "format": "bogus"}),
    ("patternProperties", {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}}),
    ("minProperties", {"type": "object", "minProperties": 1}),
    ("multipleOf", {"type": "integer", "multipleOf": 5}),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]}),
]


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def first_line(text: str, width: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def bit_allowed(bitmask, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token >> 5]) >> (token & 31)) & 1)


def count_allowed(bitmask, row: int, vocab: int) -> int:
    import torch

    bits = (bitmask[row].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return int(bits.reshape(-1)[:vocab].sum())


# --------------------------------------------------------------------------------------------
# Engines: a thin uniform wrapper; the calls inside are the ones the engine would make.
# --------------------------------------------------------------------------------------------


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], dynamic: bool = False):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.dynamic = dynamic
        if dynamic:
            self.name = "xgrammar(dynamic)"
        started = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=True,
                                            enable_dynamic_compilation=dynamic)
        self.setup_s = time.perf_counter() - started
        self.version = xgr.__version__ if hasattr(xgr, "__version__") else _dist_version("xgrammar")

    # compile = CompiledGrammar (cached by the compiler); matcher = GrammarMatcher(compiled)
    def compile(self, kind: str, spec, compiler=None):
        c = compiler or self.compiler
        if kind == "json_schema":
            return c.compile_json_schema(json.dumps(spec), any_whitespace=True)
        if kind == "json_object":
            return c.compile_builtin_json_grammar()
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "choice":
            import re

            return c.compile_regex("(" + "|".join(re.escape(s) for s in spec) + ")")
        if kind == "lark":
            return c.compile_lark(spec)
        if kind == "gbnf":
            return c.compile_grammar(spec)
        raise ValueError(kind)

    def fresh_compiler(self):
        return self.xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False,
                                        enable_dynamic_compilation=self.dynamic)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def allocate(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)

    def fill(self, matcher, bitmask, row: int):
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def completed(self, matcher) -> bool:  # the output so far is a whole valid string
        return matcher.is_completed()

    def finished(self, matcher) -> bool:  # EOS accepted (or terminated)
        return matcher.is_terminated()

    def state_after_reject(self, matcher) -> str:
        return f"is_terminated={matcher.is_terminated()} (state unchanged, can go on)"

    def batch_fill(self, matchers, bitmask):
        if not hasattr(self, "_batch"):
            self._batch = self.xgr.BatchGrammarMatcher(max_threads=2)
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def validate_no_tokenizer(self, kind: str, text: str) -> str:
        """'' if it compiles to a grammar (no tokenizer involved), else the error."""
        g = self.xgr.Grammar
        try:
            if kind == "json_schema":
                g.from_json_schema(text)
            elif kind == "regex":
                g.from_regex(text)
            elif kind == "lark":
                g.from_lark(text)
            else:
                g.from_ebnf(text)
        except Exception as exc:  # noqa: BLE001 - we report whatever it raises
            return f"{type(exc).__name__}: {first_line(exc, 200)}"
        return ""

    def compile_error(self, kind: str, text: str) -> str:
        try:
            if kind == "json_schema":
                self.compiler.compile_json_schema(text)
            elif kind == "regex":
                self.compiler.compile_regex(text)
            elif kind == "lark":
                self.compiler.compile_lark(text)
            else:
                self.compiler.compile_grammar(text)
        except Exception as exc:  # noqa: BLE001
            return f"raises {type(exc).__module__}.{type(exc).__name__}: {first_line(exc, 160)}"
        return "compiles (no error)"


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.llg_torch = llguidance.torch
        self.vocab_size = vocab_size
        started = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        self.setup_s = time.perf_counter() - started
        self.version = llguidance.__version__

    def grammar(self, kind: str, spec) -> str:
        M = self.llg.LLMatcher
        if kind == "json_schema":
            return M.grammar_from_json_schema(spec if isinstance(spec, str) else json.dumps(spec))
        if kind == "json_object":
            return M.grammar_from_json_schema('{"type": "object"}')
        if kind == "regex":
            return M.grammar_from_regex(spec)
        if kind == "choice":
            return self.llg.grammar_from("choice", json.dumps(spec))
        if kind == "lark":
            return M.grammar_from_lark(spec)
        if kind == "gbnf":
            return self.llg.grammar_from("gbnf", spec)
        raise ValueError(kind)

    # compile = a pristine LLMatcher (the lexer/parser is built in its constructor; no cache);
    # matcher = pristine.deep_copy()
    def compile(self, kind: str, spec, compiler=None):
        matcher = self.llg.LLMatcher(self.tok, self.grammar(kind, spec), log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def fresh_compiler(self):
        return None

    def matcher(self, compiled):
        return compiled.deep_copy()

    def allocate(self, rows: int):
        return self.llg_torch.allocate_token_bitmask(rows, self.vocab_size)

    def fill(self, matcher, bitmask, row: int):
        self.llg_torch.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def completed(self, matcher) -> bool:
        return matcher.is_accepting()

    def finished(self, matcher) -> bool:
        return matcher.is_stopped()

    def state_after_reject(self, matcher) -> str:
        return f"is_error={matcher.is_error()} (sticky) get_error={first_line(matcher.get_error(), 70)!r}"

    def batch_fill(self, matchers, bitmask):
        if not hasattr(self, "_executor"):
            self._executor = self.llg.LLExecutor(num_threads=2)
        self.llg_torch.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def validate_no_tokenizer(self, kind: str, text: str) -> str:
        try:
            grammar = self.grammar(kind, text)
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {first_line(exc, 200)}"
        is_error, messages = self.llg.LLMatcher.validate_grammar_with_warnings(grammar)
        return first_line("; ".join(messages), 200) if is_error else ""

    def compile_error(self, kind: str, text: str) -> str:
        try:
            grammar = self.grammar(kind, text)
        except Exception as exc:  # noqa: BLE001
            return f"grammar_from_* raises {type(exc).__name__}: {first_line(exc, 160)}"
        matcher = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if matcher.is_error():
            return f"no raise; is_error()=True get_error(): {first_line(matcher.get_error(), 140)}"
        return "compiles (no error)"


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


ENGINES = {"xgrammar": XGrammar, "llguidance": LLGuidance,
           "xgrammar-dynamic": lambda *a: XGrammar(*a, dynamic=True)}


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: str
    compile_ms: float = float("nan")
    repeat_ms: float = float("nan")
    matcher_us: float = float("nan")
    tokens: int = 0
    fill_us: list[float] = field(default_factory=list)
    accept_us: list[float] = field(default_factory=list)
    first_fill_us: float = float("nan")
    ok: str = ""  # "ok" or what went wrong
    end: str = ""


def walk(engine, case: Case, tokenizer, eos: int, repeat: int) -> CaseResult:
    res = CaseResult(case.name)
    try:
        started = time.perf_counter()
        compiled = engine.compile(case.kind, case.spec)
        res.compile_ms = (time.perf_counter() - started) * 1e3
    except Exception as exc:  # noqa: BLE001
        res.ok = f"compile failed: {first_line(exc, 80)}"
        return res
    started = time.perf_counter()
    engine.compile(case.kind, case.spec)
    res.repeat_ms = (time.perf_counter() - started) * 1e3

    tokens = tokenizer.encode(case.output, add_special_tokens=False)
    res.tokens = len(tokens)
    bitmask = engine.allocate(1)
    for rep in range(repeat):
        started = time.perf_counter_ns()
        matcher = engine.matcher(compiled)
        made_us = (time.perf_counter_ns() - started) / 1e3
        if rep == 0:
            res.matcher_us = made_us
        for step, token in enumerate(tokens):
            started = time.perf_counter_ns()
            engine.fill(matcher, bitmask, 0)
            fill = (time.perf_counter_ns() - started) / 1e3
            if rep == 0 and step == 0:
                res.first_fill_us = fill
            res.fill_us.append(fill)
            if not bit_allowed(bitmask, 0, token):
                res.ok = f"token {step} ({tokenizer.convert_ids_to_tokens(token)!r}) masked out"
                return res
            started = time.perf_counter_ns()
            accepted = engine.accept(matcher, token)
            res.accept_us.append((time.perf_counter_ns() - started) / 1e3)
            if not accepted:
                res.ok = f"token {step} ({tokenizer.convert_ids_to_tokens(token)!r}) rejected"
                return res
        engine.fill(matcher, bitmask, 0)
        if rep == 0:
            allowed = count_allowed(bitmask, 0, engine.vocab_size)
            eos_ok = bit_allowed(bitmask, 0, eos)
            completed = engine.completed(matcher)
            accepted_eos = engine.accept(matcher, eos)
            res.end = (f"at end: completed={completed} eos_allowed={eos_ok} allowed={allowed}; "
                       f"accept(EOS)={accepted_eos} finished={engine.finished(matcher)}")
    res.ok = "ok"
    return res


def print_case_table(engine, results: list[CaseResult]) -> None:
    print(f"\n== {engine.name} {engine.version}: tokenizer set-up {engine.setup_s * 1e3:.0f} ms, "
          f"first compile in the process (a 1-field schema) {engine.warmup_ms:.1f} ms ==")
    header = (f"{'case':<20}{'compile ms':>11}{'repeat ms':>10}{'matcher us':>11}{'tokens':>7}"
              f"{'fill med':>9}{'fill p99':>9}{'fill 1st':>9}{'accept med':>11}{'acc p99':>8}  result")
    print(header)
    all_fill, all_accept = [], []
    for r in results:
        all_fill += r.fill_us
        all_accept += r.accept_us
        fm = statistics.median(r.fill_us) if r.fill_us else float("nan")
        fp = pct(r.fill_us, 0.99) if r.fill_us else float("nan")
        am = statistics.median(r.accept_us) if r.accept_us else float("nan")
        ap = pct(r.accept_us, 0.99) if r.accept_us else float("nan")
        print(f"{r.case:<20}{r.compile_ms:>11.2f}{r.repeat_ms:>10.3f}{r.matcher_us:>11.1f}{r.tokens:>7}"
              f"{fm:>9.1f}{fp:>9.1f}{r.first_fill_us:>9.1f}{am:>11.1f}{ap:>8.1f}  {r.ok}")
    if all_fill:
        print(f"{'ALL (pooled)':<20}{sum(r.compile_ms for r in results):>11.2f}{'':>10}{'':>11}"
              f"{sum(r.tokens for r in results):>7}{statistics.median(all_fill):>9.1f}{pct(all_fill, 0.99):>9.1f}"
              f"{'':>9}{statistics.median(all_accept):>11.1f}{pct(all_accept, 0.99):>8.1f}  (compile: sum)")
    for r in results:
        if r.end:
            print(f"   {r.case:<18} {r.end}")


def heartbeat_during(work, tick_s: float = 0.0005) -> tuple[float, float]:
    """Run `work` in a thread pool while the main thread ticks like an event loop.

    Returns (work seconds, the longest gap between main-thread ticks in seconds). A gap close to
    the work time means the work held the GIL; a gap of about a tick means it released it.
    """
    with ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        future = pool.submit(work)
        longest, last = 0.0, time.perf_counter()
        while not future.done():
            time.sleep(tick_s)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now
        future.result()
        return time.perf_counter() - started, longest


def gil_checks(engine, cases: list[Case]) -> None:
    heavy = next(c for c in cases if c.name == "big_150_patterns")
    work_s, gap_s = heartbeat_during(lambda: engine.compile(heavy.kind, heavy.spec, engine.fresh_compiler()))
    print(f"  compile {heavy.name} (no cache) in a thread: {work_s * 1e3:.1f} ms, "
          f"longest main-thread gap {gap_s * 1e3:.2f} ms")

    case = next(c for c in cases if c.name == "json_object")
    compiled = engine.compile(case.kind, case.spec)
    matchers = [engine.matcher(compiled) for _ in range(1)]
    bitmask = engine.allocate(1)

    def fill_many():
        for _ in range(2000):
            engine.fill(matchers[0], bitmask, 0)

    work_s, gap_s = heartbeat_during(fill_many)
    print(f"  2000 mask fills in a thread: {work_s * 1e3:.1f} ms, longest main-thread gap {gap_s * 1e3:.2f} ms")

    # two threads compiling different grammars at once on the same tokenizer/compiler
    errors = []

    def compile_some(offset: int):
        try:
            for case in cases[offset::2]:
                m = engine.matcher(engine.compile(case.kind, case.spec, engine.fresh_compiler()))
                tokens = engine_tokens[case.name]
                assert all(engine.accept(m, t) for t in tokens), case.name
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=compile_some, args=(i,)) for i in range(2)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"  2 threads compiling + walking all cases concurrently: {(time.perf_counter() - started) * 1e3:.1f} ms, "
          f"errors: {errors or 'none'}")


engine_tokens: dict[str, list[int]] = {}


def batch_check(engine, cases: list[Case], rows: int) -> None:
    """Fill `rows` rows (matchers at different positions of different cases): batch call vs a loop."""
    picked = []
    compiled = {c.name: engine.compile(c.kind, c.spec) for c in cases}
    i = 0
    while len(picked) < rows:
        case = cases[i % len(cases)]
        m = engine.matcher(compiled[case.name])
        tokens = engine_tokens[case.name]
        for t in tokens[: (i * 3) % max(1, len(tokens))]:
            engine.accept(m, t)
        picked.append(m)
        i += 1
    bitmask = engine.allocate(rows)
    loop, batch = [], []
    for _ in range(20):
        started = time.perf_counter_ns()
        for r, m in enumerate(picked):
            engine.fill(m, bitmask, r)
        loop.append((time.perf_counter_ns() - started) / 1e3)
        reference = bitmask.clone()
        bitmask.fill_(0)
        started = time.perf_counter_ns()
        engine.batch_fill(picked, bitmask)
        batch.append((time.perf_counter_ns() - started) / 1e3)
        same = bool((reference == bitmask).all())
    print(f"  {rows} rows: loop of fill() median {statistics.median(loop):.0f} us, "
          f"batch call (2 threads) median {statistics.median(batch):.0f} us, same masks: {same}")


def apply_checks(vocab: int, bitmask_rows) -> None:
    import torch
    import xgrammar as xgr

    bits = torch.arange(32, dtype=torch.int32)

    bits8 = torch.arange(8, dtype=torch.uint8)

    def apply_torch(logits, bitmask):
        # engine-independent: unpack bits and mask; works on CPU and CUDA alike
        allowed = ((bitmask.unsqueeze(-1) >> bits.to(bitmask.device)) & 1).bool().flatten(1)[:, : logits.shape[1]]
        logits.masked_fill_(~allowed, float("-inf"))

    def apply_torch_u8(logits, bitmask):
        # the same through bytes (little-endian): a 4x smaller intermediate
        allowed = ((bitmask.view(torch.uint8).unsqueeze(-1) >> bits8.to(bitmask.device)) & 1).flatten(1)
        logits.masked_fill_(allowed[:, : logits.shape[1]] == 0, float("-inf"))

    print(f"\n== applying a bitmask to float32 logits [rows, {vocab}] on CPU (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads) ==")
    for masks, rows in [(m, r) for m in ("real", "random") for r in (1, 8, 64)]:
        if masks == "real":  # the masks of the cases at their first step (mostly sparse)
            bitmask = bitmask_rows[torch.arange(rows) % bitmask_rows.shape[0]].contiguous()
        else:  # half the tokens allowed
            bitmask = torch.randint(-2**31, 2**31 - 1, (rows, bitmask_rows.shape[1]), dtype=torch.int32)
        base = torch.randn(rows, vocab)
        a, b, c = base.clone(), base.clone(), base.clone()
        xgr.apply_token_bitmask_inplace(a, bitmask)
        apply_torch(b, bitmask)
        apply_torch_u8(c, bitmask)
        same = bool(torch.equal(a, b)) and bool(torch.equal(a, c))
        timings = {}
        for name, fn in (("xgr.apply_token_bitmask_inplace", lambda x: xgr.apply_token_bitmask_inplace(x, bitmask)),
                         ("torch int32 unpack", lambda x: apply_torch(x, bitmask)),
                         ("torch uint8 unpack", lambda x: apply_torch_u8(x, bitmask))):
            samples = []
            for _ in range(30):
                x = base.clone()
                started = time.perf_counter_ns()
                fn(x)
                samples.append((time.perf_counter_ns() - started) / 1e3)
            timings[name] = statistics.median(samples)
        print(f"  {masks:<6} rows={rows:<3} " + "  ".join(f"{k}: {v:.0f} us" for k, v in timings.items()) + f"  same result: {same}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="a model as --model takes it (for its tokenizer and vocab size)")
    parser.add_argument("--engines", default="xgrammar,llguidance",
                        help="comma list of: xgrammar, llguidance, xgrammar-dynamic (enable_dynamic_compilation)")
    parser.add_argument("--repeat", type=int, default=3, help="walks of each valid output per case")
    parser.add_argument("--batch-rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the apply timing")
    parser.add_argument("--skip-extras", action="store_true", help="only the per-case table")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from seesaw.config import default_cache_dir
    from seesaw.model.resolve import resolve_model

    torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model, default_cache_dir())
    vocab = int(resolved.hf_config["vocab_size"])
    eos = resolved.hf_config.get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, list) else [eos]
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(resolved.tokenizer_folder))
    load_s = time.perf_counter() - started
    print(f"model {resolved.name}: config vocab_size={vocab}, len(tokenizer)={len(tokenizer)}, "
          f"eos={eos_ids} ({tokenizer.convert_ids_to_tokens(eos_ids)}), tokenizer {type(tokenizer).__name__} "
          f"loaded in {load_s * 1e3:.0f} ms")

    cases = build_cases()
    for case in cases:
        engine_tokens[case.name] = tokenizer.encode(case.output, add_special_tokens=False)
    engines = [ENGINES[name](tokenizer, vocab, eos_ids) for name in args.engines.split(",")]
    last_bitmask = None
    for engine in engines:
        started = time.perf_counter()
        engine.compile("json_schema", {"type": "object", "properties": {"w": {"type": "string"}}})
        engine.warmup_ms = (time.perf_counter() - started) * 1e3
        results = [walk(engine, case, tokenizer, eos_ids[0], args.repeat) for case in cases]
        print_case_table(engine, results)
    if args.skip_extras:
        return

    for engine in engines:
        print(f"\n== {engine.name}: errors (compile with the tokenizer) ==")
        for kind, label, text in BAD_INPUTS:
            print(f"  {kind:<11} {label:<15} {engine.compile_error(kind, text)}")
        print(f"== {engine.name}: unsupported JSON-schema keywords (compile with the tokenizer) ==")
        for label, schema in UNSUPPORTED:
            print(f"  {label:<18} {engine.compile_error('json_schema', json.dumps(schema))}")
        print(f"== {engine.name}: validation without a tokenizer ==")
        for kind, label, text in BAD_INPUTS[:6]:
            print(f"  {kind:<11} {label:<15} {engine.validate_no_tokenizer(kind, text) or 'valid'}")
        samples = []
        for case in cases:
            if case.kind != "json_schema":
                continue
            text = json.dumps(case.spec)
            started = time.perf_counter_ns()
            verdict = engine.validate_no_tokenizer("json_schema", text)
            samples.append((time.perf_counter_ns() - started) / 1e3)
            assert verdict == "", (case.name, verdict)  # a check of the script, not a timing
        print(f"  valid schemas: median {statistics.median(samples):.0f} us, max {max(samples):.0f} us per schema")

        print(f"== {engine.name}: rejecting a token / after EOS ==")
        case = cases[0]
        m = engine.matcher(engine.compile(case.kind, case.spec))
        bad = tokenizer.encode("hello", add_special_tokens=False)[0]
        print(f"  accept({bad}, not allowed at start) -> {engine.accept(m, bad)}; {engine.state_after_reject(m)}")
        m = engine.matcher(engine.compile("regex", r"\d{3}-\d{4}"))
        for t in engine_tokens["regex_phone"]:
            engine.accept(m, t)
        bm = engine.allocate(1)
        engine.fill(m, bm, 0)
        print(f"  regex done: allowed tokens={count_allowed(bm, 0, vocab)} (EOS only: "
              f"{count_allowed(bm, 0, vocab) == 1 and bit_allowed(bm, 0, eos_ids[0])})")
        print(f"  accept(EOS) -> {engine.accept(m, eos_ids[0])}, finished={engine.finished(m)}; "
              f"accept another token -> {engine.accept(m, bad)}")
        try:
            engine.fill(m, bm, 0)
            print(f"  fill after finish: no error, allowed={count_allowed(bm, 0, vocab)}")
        except Exception as exc:  # noqa: BLE001
            print(f"  fill after finish raises {type(exc).__name__}: {first_line(exc, 100)}")

        print(f"== {engine.name}: GIL / threads ==")
        gil_checks(engine, cases)
        print(f"== {engine.name}: batch fill ==")
        batch_check(engine, cases, args.batch_rows)
        last_bitmask = engine.allocate(args.batch_rows)
        engine.batch_fill([engine.matcher(engine.compile(c.kind, c.spec)) for c in cases[: args.batch_rows]], last_bitmask)

    if last_bitmask is not None:
        apply_checks(vocab, last_bitmask)


if __name__ == "__main__":
    main()
