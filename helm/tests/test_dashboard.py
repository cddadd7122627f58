"""The Grafana dashboard (helm/stepgate/dashboards/stepgate.json) against what stepgate exports.

The exported metrics are read from the real binary, not from a list: two servers are started on
the demo policy (one plaintext, one with TLS, whose metrics exist only then), driven through an
ALLOW, a STEP_UP, a DENY, an unknown key id, a repeated token, a policy reload (SIGHUP) and a
certificate reload, and scraped. Every metric a panel or a variable queries must be one of them,
and every label a query filters or groups by must be on that metric (or be one Prometheus adds
to every target).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from chart_render import CHART, REPO

DASHBOARD = CHART / "dashboards" / "stepgate.json"
DEMO_POLICY = REPO / "examples" / "stepgate.yaml"
START_SECONDS = 20
# Labels Prometheus attaches to every scraped series (Kubernetes service discovery through a
# ServiceMonitor): queries may filter and group by them.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint"}


# ---------------------------------------------------------------------------------------------
# Running stepgate


class Server:
    """`stepgate serve` on ephemeral ports, its stderr drained (a full pipe would block it)."""

    def __init__(self, binary: str, *extra: str):
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", str(DEMO_POLICY), "--listen", "127.0.0.1:0",
             "--metrics-listen", "127.0.0.1:0", "--log-format", "json", *extra],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.log: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:
            for line in self.proc.stderr:
                self.log.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        self.grpc, self.metrics = None, None
        deadline = time.monotonic() + START_SECONDS
        while self.grpc is None or self.metrics is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                pytest.fail("stepgate did not start listening:\n" + "".join(self.log[-20:]), pytrace=False)
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            message = entry.get("message", "")
            if message.startswith("stepgate listening on"):
                self.grpc = entry["addr"]
            elif message.startswith("metrics listening on"):
                self.metrics = entry["addr"]

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as response:
            return response.read().decode()

    def wait_for_sample(self, name: str) -> str:
        deadline = time.monotonic() + 15
        while True:
            text = self.scrape()
            if re.search(rf"^{name}[{{ ]", text, re.M):
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"no {name} sample within 15 s:\n" + "".join(self.log[-20:]), pytrace=False)
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run(binary: str, *args: str) -> str:
    result = subprocess.run([binary, *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"stepgate {' '.join(args)} exited {result.returncode}: {result.stderr}"
    return result.stdout.strip()


def decide(binary: str, server: Server, token: str | None) -> dict:
    args = ["decide", "--server", f"http://{server.grpc}", "--operation", "payments.wire_transfer"]
    if token:
        args += ["--token", token]
    return json.loads(run(binary, *args))


# ---------------------------------------------------------------------------------------------
# The exposition format


@dataclass
class Exported:
    types: dict[str, str] = field(default_factory=dict)
    labels: dict[str, set[str]] = field(default_factory=dict)

    def add(self, text: str) -> None:
        for line in text.splitlines():
            if m := re.match(r"# TYPE (\S+) (\S+)$", line):
                self.types[m.group(1)] = m.group(2)
            elif line and not line.startswith("#"):
                m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s", line)
                assert m, f"not a sample line: {line!r}"
                names = set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="(?:[^"\\]|\\.)*"', m.group(3) or ""))
                self.labels.setdefault(m.group(1), set()).update(names)

    def queryable(self) -> set[str]:
        """The series names PromQL can select: samples seen, and each family's by its type."""
        names = set(self.labels)
        for family, kind in self.types.items():
            base = family.removesuffix("_total")
            if kind == "histogram":
                names |= {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
            elif kind == "summary":
                names |= {family, f"{family}_sum", f"{family}_count"}
            elif kind == "counter":
                names.add(f"{base}_total")
            else:
                names.add(family)
        return names


@pytest.fixture(scope="module")
def exported(stepgate_bin, make_certificate, tmp_path_factory) -> Exported:
    found = Exported()

    plain = Server(stepgate_bin)
    try:
        allow_token = run(stepgate_bin, "token", "--acrs", "c1", "--xms-cc", "cp1")
        outcomes = [
            decide(stepgate_bin, plain, allow_token)["outcome"],
            decide(stepgate_bin, plain, allow_token)["outcome"],  # the second one is a cache hit
            decide(stepgate_bin, plain, run(stepgate_bin, "token", "--xms-cc", "cp1"))["outcome"],
            decide(stepgate_bin, plain, None)["outcome"],
            decide(stepgate_bin, plain, run(stepgate_bin, "token", "--kid", "no-such-key"))["reason"],
        ]
        assert outcomes == ["ALLOW", "ALLOW", "STEP_UP", "DENY", "unknown_kid"]
        plain.proc.send_signal(signal.SIGHUP)
        found.add(plain.wait_for_sample("stepgate_policy_reloads_total"))
    finally:
        plain.stop()

    certs = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate(certs, "tls", "localhost")
    tls = Server(stepgate_bin, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        # A renewed certificate, swapped in as cert-manager's Secret update would be.
        new_cert, new_key = make_certificate(certs / "renewed", "tls", "localhost", days=3)
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        found.add(tls.wait_for_sample("stepgate_tls_reloads_total"))
    finally:
        tls.stop()
    return found


# ---------------------------------------------------------------------------------------------
# PromQL, as much of it as naming metrics and labels needs


TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      |(?P<range>\[[^\]]*\])
      |(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
      |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
      |(?P<punct>[{}(),])
      |(?P<op>=~|!~|!=|==|<=|>=|=|[-+*/%^<>])
      |(?P<space>\s+)""",
    re.X,
)
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"bool", "offset", "and", "or", "unless", "atan2", "inf", "nan"}


@dataclass
class Query:
    selectors: list[tuple[str, set[str]]]  # (metric, labels its matchers name)
    grouping: set[str]  # labels of by/without/on/ignoring clauses

    @property
    def metrics(self) -> set[str]:
        return {metric for metric, _ in self.selectors}


def parse(expr: str) -> Query:
    tokens, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        assert m, f"cannot read {expr[pos:]!r} in {expr!r}"
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
        pos = m.end()
    depth = 0
    for kind, text in tokens:
        depth += {"(": 1, ")": -1}.get(text, 0) if kind == "punct" else 0
        assert depth >= 0, f"unbalanced parentheses in {expr!r}"
    assert depth == 0, f"unbalanced parentheses in {expr!r}"

    query, i = Query([], set()), 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "ident" and text in KEYWORDS:
            if text in GROUPING and following == "(":
                i += 2
                while tokens[i][1] != ")":
                    if tokens[i][0] == "ident":
                        query.grouping.add(tokens[i][1])
                    i += 1
        elif kind == "ident" and (following == "(" or following in ("by", "without")):
            pass  # a function, or an aggregation (`sum by (x) (…)`)
        elif kind == "ident":
            labels: set[str] = set()
            if following == "{":
                i += 2
                while tokens[i][1] != "}":
                    if tokens[i][0] == "ident":
                        labels.add(tokens[i][1])
                        assert tokens[i + 1][0] == "op" and tokens[i + 2][0] == "string", f"bad matcher in {expr!r}"
                        i += 2
                    i += 1
            query.selectors.append((text, labels))
        elif text == "{":
            raise AssertionError(f"a selector without a metric name in {expr!r}")
        i += 1
    return query


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(dash: dict) -> Iterator[dict]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dash: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in panels(dash):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_]\w*)\)", variable["definition"])
            assert m, f"variable {variable['name']}: expected label_values(series, label)"
            yield f"variable {variable['name']}", f"group by ({m.group(2)}) ({m.group(1)})"


# ---------------------------------------------------------------------------------------------
# Tests


def test_dashboard_is_a_grafana_dashboard_on_a_datasource_variable():
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] == "stepgate" and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dash):
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_binary_exports_step_ups_per_rule_after_a_step_up(exported):
    assert exported.labels.get("stepgate_step_ups_total") == {"door", "rule", "auth_context"}, (
        "after a STEP_UP decision stepgate must export stepgate_step_ups_total{door,rule,auth_context}"
    )
    assert "rule" in exported.labels["stepgate_decisions_total"]


def test_every_queried_metric_is_exported(exported):
    known = exported.queryable()
    missing = [
        f"{where}: {metric}"
        for where, expr in queries(dashboard())
        for metric in sorted(parse(expr).metrics - known)
    ]
    assert not missing, "queries name metrics stepgate does not export:\n" + "\n".join(missing)


def test_every_queried_label_is_on_its_metric(exported):
    problems = []
    for where, expr in queries(dashboard()):
        query = parse(expr)
        assert query.metrics, f"{where}: no metric in {expr!r}"
        for metric, labels in query.selectors:
            on_metric = exported.labels.get(metric)
            if on_metric is None:
                problems.append(f"{where}: the servers exported no sample of {metric}, so its labels are unknown")
                continue
            problems += [f"{where}: {metric} has no label {label!r}" for label in labels - on_metric - TARGET_LABELS]
            problems += [
                f"{where}: grouped by {label!r}, which {metric} lacks"
                for label in query.grouping - on_metric - TARGET_LABELS
            ]
    assert not problems, "\n".join(problems)


REQUIRED_QUERIES = {
    "decisions by outcome": r"sum by \(outcome\) \(rate\(stepgate_decisions_total\{",
    "step-ups per rule": r"^sum by \(rule\) \(rate\(stepgate_step_ups_total\{[^}]*\}\[[^\]]+\]\)\)$",
    "step-up share per rule": r"^sum by \(rule\) \(rate\(stepgate_step_ups_total\{.*\)\) / sum by \(rule\) \(rate\(stepgate_decisions_total\{",
    "p99 decision latency": r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(stepgate_decision_duration_seconds_bucket\{",
    "key age": r"time\(\) - stepgate_key_last_success_timestamp_seconds\{",
    "token cache hit ratio": r'stepgate_token_cache_total\{[^}]*event="hit"\}.*/.*stepgate_token_cache_total\{[^}]*event=~"hit\|miss"\}',
    "policy reload failures": r'stepgate_policy_reloads_total\{[^}]*result="failure"\}',
    "policy generation": r"stepgate_policy_generation\{",
    "TLS certificate expiry": r"stepgate_tls_certificate_expiry_timestamp_seconds\{[^}]*\}\) - time\(\)",
}


@pytest.mark.parametrize("what", REQUIRED_QUERIES)
def test_dashboard_answers_the_operators_questions(what):
    pattern = re.compile(REQUIRED_QUERIES[what])
    assert any(pattern.search(expr) for _, expr in queries(dashboard())), f"no panel shows {what}"


def test_parser_finds_metrics_labels_and_grouping():
    query = parse(
        'sum by (rule) (rate(a_total{x="1", y=~"$v"}[$__rate_interval])) '
        '/ on (rule) group_left sum by (rule) (b) or vector(0)'
    )
    assert query.selectors == [("a_total", {"x", "y"}), ("b", set())]
    assert query.grouping == {"rule"}
    with pytest.raises(AssertionError):
        parse("sum(rate(a[5m])")
