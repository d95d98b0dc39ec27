"""Planning for several identical nodes: the candidates (one engine with a node's layout or pair on
every node, or pipelines across nodes; never a pair's replica or a tensor-parallel group across
nodes), the node link in the simulation, and `seesaw-cli plan --nodes`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from seesaw.config import SchedulerConfig
from seesaw.layout import Layout, validate
from seesaw.sim.catalog import Catalog
from seesaw.sim.cost import MESSAGE_BYTES, SAMPLED_BYTES, CostModel, StepShape
from seesaw.sim.planner import PlanOptions, candidates, evaluate, plan
from seesaw.sim.simulator import RunSpec, simulate
from seesaw.sim.workload import Workload, dealt, fixed
from seesaw_cli.main import app

SLOW = {"node_links": {"slow": {"bandwidth_gbs": 0.125, "efficiency": 1.0, "latency_us": 1000}}}  # 1 Gb/s, 1 ms


def _catalog() -> Catalog:
    catalog = Catalog()
    catalog.add(SLOW, "the test's node links")
    return catalog


def _plan_output(*flags: str) -> str:
    result = CliRunner().invoke(app, ["plan", "--model", "llama3-8b", "--gpus", "2xL4", "--workload", "arxiv",
                                      "--num-requests", "40", "--jobs", "1", *flags])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_one_node_is_planned_exactly_as_without_the_flag(tmp_path):
    without, with_flag = tmp_path / "without.json", tmp_path / "with.json"
    assert _plan_output("--output-json", str(without)) == _plan_output("--nodes", "1", "--output-json", str(with_flag))
    assert json.loads(without.read_text()) == json.loads(with_flag.read_text())
    catalog = Catalog()
    cost = CostModel(catalog.model("llama3-8b"), catalog.node("8xA10"))
    assert candidates(cost, PlanOptions(num_nodes=1)) == candidates(cost, PlanOptions())


def test_requests_are_dealt_to_the_nodes_in_turn():
    work = Workload("w", tuple((prompt, 1) for prompt in range(1, 8)))
    parts = dealt(work, 3)
    assert [part.lengths for part in parts] == [((1, 1), (4, 1), (7, 1)), ((2, 1), (5, 1)), ((3, 1), (6, 1))]
    assert sorted(length for part in parts for length in part.lengths) == sorted(work.lengths)


def test_a_model_that_fits_one_node_runs_about_n_times_as_fast_on_n_nodes():
    catalog = _catalog()
    model, node = catalog.model("llama3-8b"), catalog.node("2xL4")
    work = fixed(800, 512, 64)  # large enough that the ramp and the tail of each node's share hardly count
    fast, slow = CostModel(model, node, catalog.node_link("eth100g")), CostModel(model, node, catalog.node_link("slow"))
    static = evaluate(fast, RunSpec(Layout(tp=2), host_buffer_gb=None), work).throughput
    pair = evaluate(fast, RunSpec(Layout(pp=2), Layout(tp=2), host_buffer_gb=None), work).throughput
    over_nodes = RunSpec(Layout(dp=2, tp=2), num_nodes=2)  # one engine, a t2 replica on each node
    pairs = RunSpec(Layout(dp=2, pp=2), Layout(dp=2, tp=2), num_nodes=2, host_buffer_gb=None)  # a p2->t2 replica each
    across = RunSpec(Layout(tp=2, pp=2), num_nodes=2)  # one replica, a stage on each node
    assert str(over_nodes) == "2 nodes x (t2)" and str(pairs) == "2 nodes x (p2->t2)"
    assert str(across) == "t2p2 across 2 nodes"
    on_fast = {spec: evaluate(fast, spec, work).throughput for spec in (over_nodes, pairs, across)}
    on_slow = {spec: evaluate(slow, spec, work).throughput for spec in (over_nodes, pairs, across)}
    for spec, one_node in ((over_nodes, static), (pairs, pair)):
        assert 0.95 * 2 <= on_fast[spec] / one_node <= 1.02 * 2  # within 5% of twice
    # A very slow node link: one engine's head sends a few bytes a step over it, and only a
    # pipeline across nodes passes activations through it.
    for spec in (over_nodes, pairs):
        assert on_slow[spec] >= 0.99 * on_fast[spec]
    assert on_slow[across] < 0.8 * on_fast[across]


def test_a_model_too_large_for_one_node_runs_only_with_pipelines_across_nodes():
    catalog = _catalog()
    model, node = catalog.model("llama2-70b"), catalog.node("4xL4")  # 128 GiB of weights, 90 GiB of GPUs a node
    work = fixed(64, 1024, 32)
    one_node = plan(CostModel(model, node), work)
    assert one_node and all(c.result is None and c.error for c in one_node)  # no room for KV, or for the weight store
    throughputs = {}
    for name in ("ib400g", "ib200g", "eth100g", "eth25g", "slow"):  # fastest first
        ranked = plan(CostModel(model, node, catalog.node_link(name)), work, PlanOptions(num_nodes=2))
        runnable = {c.name: c.throughput for c in ranked if c.result is not None}
        assert set(runnable) == {"t4p2 across 2 nodes", "t2p4 across 2 nodes", "p8 across 2 nodes"}
        assert {c.name for c in ranked if c.result is None} == {f"2 nodes x ({c.name})" for c in one_node}
        throughputs[name] = runnable
    for run in throughputs["ib400g"]:
        figures = [throughputs[name][run] for name in throughputs]
        assert figures == sorted(figures, reverse=True) and figures[-1] < figures[0]


def test_no_candidate_spans_nodes_with_a_pairs_replica_or_a_tensor_parallel_group():
    catalog = Catalog()
    cost = CostModel(catalog.model("llama3-8b"), catalog.node("4xA10"), catalog.node_link("eth100g"))
    runs = candidates(cost, PlanOptions(num_nodes=3))
    pairs = [run for run in runs if run.is_seesaw]
    assert pairs and all(run.num_nodes == 3 and run.layout.world_size == 12 for run in pairs)
    for run in pairs:  # a node's pair on each node: every replica's ranks on one node, in both layouts
        for layout in (run.layout, run.decode_layout):
            assert layout.dp % 3 == 0
            assert all(len({rank // 4 for rank in layout.replica_ranks(r)}) == 1 for r in range(layout.dp))
    one_node = {(run.layout, run.decode_layout) for run in candidates(cost, PlanOptions()) if run.is_seesaw}
    assert {(Layout(p.dp // 3, p.tp, p.pp), Layout(d.dp // 3, d.tp, d.pp)) for p, d in
            ((run.layout, run.decode_layout) for run in pairs)} == one_node
    static = [run for run in runs if not run.is_seesaw]
    assert all(run.num_nodes == 3 and run.host_buffer_gb == 0.0 for run in static)
    # Brute force: every layout of the 12 GPUs whose tensor-parallel groups each sit on one node.
    expected = set()
    for dp in range(1, 13):
        for tp in range(1, 13):
            if 12 % (dp * tp):
                continue
            layout = Layout(dp, tp, 12 // (dp * tp))
            try:
                validate(layout, cost.spec.shape)
            except ValueError:
                continue
            if all(len({rank // 4 for rank in layout.tp_group(rank)}) == 1 for rank in range(12)):
                expected.add(layout)
    assert {run.layout for run in static} == expected
    assert {str(run) for run in static} >= {"3 nodes x (t4)", "3 nodes x (d4)", "t4p3 across 3 nodes"}
    with pytest.raises(ValueError, match="replicas of 8 GPUs would span nodes of 4; .* each replica stays inside a node"):
        simulate(cost, RunSpec(Layout(pp=8), Layout(tp=8), num_nodes=2), fixed(1, 8, 1))
    with pytest.raises(ValueError, match="tensor parallelism stays inside a node"):
        simulate(cost, RunSpec(Layout(tp=6, pp=2), num_nodes=3), fixed(1, 8, 1))


class _FixedStages(CostModel):
    """Every pipeline stage takes 1 s and a hop inside a node nothing; the node link is real."""

    def stage_times(self, layout: Layout, shape: StepShape) -> list[float]:
        return [1.0] * layout.pp

    def send_s(self, shape: StepShape) -> float:
        return 0.0

    def device_blocks(self, layouts, block_size: int) -> int:
        return 100


def test_a_pipeline_hop_between_nodes_and_the_tokens_home_cost_the_node_links_bandwidth_and_latency():
    catalog = _catalog()
    cost = _FixedStages(catalog.model("tiny"), catalog.node("1xL4"), catalog.node_link("slow"))
    spec = RunSpec(Layout(pp=2), num_nodes=2, scheduler=SchedulerConfig(overlap=False))  # a stage on each node
    result = simulate(cost, spec, Workload("one", ((4, 1),)))
    rate, latency_s = 0.125e9, 1e-3  # the link's bytes per second and its latency
    activations = 4 * cost.spec.hidden_size * 2  # 4 prompt tokens, 2 bytes each value
    tokens_home = MESSAGE_BYTES + SAMPLED_BYTES  # one sampled token, back to the head
    assert result.num_steps == 1
    assert result.elapsed_s == pytest.approx(1.0 + activations / rate + latency_s + 1.0 + tokens_home / rate + latency_s)


def test_plan_command_over_two_nodes_prints_the_cluster_ranking_and_how_to_run_it(tmp_path):
    written = tmp_path / "plan.json"
    output = _plan_output("--nodes", "2", "--output-json", str(written))
    assert "nodes: 2 of them, joined by eth100g" in output
    assert "2 nodes x (t2)" in output and "2 nodes x (p2->t2)" in output and "t2p2 across 2 nodes" in output
    assert "run the best on 2 nodes:" in output
    assert "--layout d2t2" in output and "--head-address tcp://HEAD:PORT --local-workers 2" in output
    assert "n=1; for i in $(seq 0 1); do seesaw-cli worker --head tcp://HEAD:PORT --rank $((n * 2 + i))" in output
    plan_json = json.loads(written.read_text())
    assert plan_json["nodes"] == 2 and plan_json["node_link"]["name"] == "eth100g"
    assert plan_json["best"] == "2 nodes x (t2)" and plan_json["commands"][0]["run"].startswith(plan_json["command"])
    rows = {row["run"] for row in plan_json["ranking"]}
    assert rows == {"2 nodes x (t2)", "2 nodes x (p2)", "2 nodes x (d2)", "t2p2 across 2 nodes", "p4 across 2 nodes",
                    "2 nodes x (p2->t2)", "2 nodes x (t2->p2)"}


def test_a_pair_chosen_over_nodes_runs_as_one_engine_with_a_replica_a_node():
    output = _plan_output("--nodes", "2", "--workload", "fixed:3000:30", "--num-requests", "64", "--node-link", "ib200g")
    assert "chosen: 2 nodes x (p2->t2) (prefill -> decode pair)" in output
    assert ("seesaw-cli batch INPUT.jsonl --model dummy:llama3-8b --device cuda --prefill-layout d2p2 "
            "--decode-layout d2t2") in output
    assert "--head-address tcp://HEAD:PORT --local-workers 2" in output
    assert "--rank $((n * 2 + i))" in output and "split" not in output


def test_plan_over_nodes_draws_the_best_pairs_slowest_node(tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "timeline.png"
    output = _plan_output("--nodes", "2", "--timeline", str(picture))
    assert "timeline of 2 nodes x (p2->t2):" in output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "0"], "error: --nodes must be at least 1, got 0"),
    (["--nodes", "-2"], "error: --nodes must be at least 1, got -2"),
    (["--nodes", "two"], "'--nodes'"),
    (["--nodes", "1.5"], "'--nodes'"),
    (["--nodes", "2", "--node-link", "carrier-pigeon"],
     "error: unknown node link 'carrier-pigeon'; known: eth100g, eth25g, ib200g, ib400g"),
    (["--node-link", "eth25g"], "error: --node-link eth25g joins nodes: give --nodes 2 or more with it"),
])
def test_plan_refuses_bad_node_counts_and_links_naming_the_flag(flags, message):
    result = CliRunner().invoke(app, ["plan", "--model", "llama3-8b", "--gpus", "2xL4", *flags])
    assert result.exit_code != 0 and message in result.output


def test_node_link_profile_errors_name_the_file_and_the_entry(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"node_links": {"roce": {"bandwidth_gbs": 0}}}))
    with pytest.raises(ValueError, match="bad.json: node link 'roce': bandwidth_gbs must be positive"):
        Catalog([bad])
    bad.write_text(json.dumps({"node_links": {"roce": {"bandwidth_gbs": 50, "all_reduce_gbs": {"2": 40}}}}))
    with pytest.raises(ValueError, match="bad.json: node link 'roce': all_reduce_gbs is for links inside a node"):
        Catalog([bad])
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"node_links": {"RoCE200": {"bandwidth_gbs": 25, "latency_us": 8}}}))
    assert Catalog([good]).node_link("roce200").latency_us == 8
