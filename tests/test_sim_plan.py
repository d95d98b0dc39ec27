"""Profiles, workloads and the planner: bad input names what and where; `seesaw-cli plan` ranks
every layout and pair of a node and prints the batch flags of the best."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from seesaw.sim.catalog import Catalog
from seesaw.sim.cost import CostModel
from seesaw.sim.planner import PlanOptions, best, candidates, layouts_of, plan
from seesaw.sim.workload import Workload, arxiv, fixed, from_jsonl, named, sharegpt, within_context
from seesaw_cli.main import app


def test_unknown_names_are_refused_with_the_known_ones():
    catalog = Catalog()
    with pytest.raises(ValueError, match="unknown GPU 'V100'.*L4"):
        catalog.node("8xV100")
    with pytest.raises(ValueError, match="unknown interconnect 'pcie9'.*pcie4x8"):
        catalog.node("8xL4", "pcie9")
    with pytest.raises(ValueError, match="L4 has no NVLink"):
        catalog.node("8xL4", "nvlink")
    with pytest.raises(ValueError, match="not COUNTxNAME"):
        catalog.node("L4")
    with pytest.raises(ValueError, match="unknown model 'gpt-9'.*llama2-70b"):
        catalog.model("gpt-9")


def test_nvlink_means_the_gpus_own_and_pcie_nodes_reach_the_host_over_it():
    catalog = Catalog()
    assert catalog.node("8xH100-SXM", "nvlink").interconnect.name == "nvlink4"
    node = catalog.node("8xL4", "pcie4x8")
    assert node.host_link.name == "pcie4x8"
    assert node.host_memory_gb == 8 * catalog.gpu("L4").host_memory_gb


def test_profile_file_errors_name_the_file_and_the_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gpus": {"X1": {"memory_gb": 8, "speed": 3}}}))
    with pytest.raises(ValueError, match=r"bad.json: gpu 'X1': unknown field\(s\) speed"):
        Catalog([bad])
    bad.write_text(json.dumps({"links": {"slow": {"bandwidth_gbs": -1}}}))
    with pytest.raises(ValueError, match="bad.json: link 'slow': bandwidth_gbs must be positive"):
        Catalog([bad])
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        Catalog([bad])
    for ring, problem in (({"2": 0}, "positive GB/s, got 2: 0"), ({"1": 10}, "of 2 or more"), ({"two": 10}, "'two'")):
        bad.write_text(json.dumps({"links": {"ring": {"bandwidth_gbs": 10, "all_reduce_gbs": ring}}}))
        with pytest.raises(ValueError, match=f"bad.json: link 'ring': all_reduce_gbs .*{problem}"):
            Catalog([bad])
    bad.write_text(json.dumps({"gpus": {"X1": {**_CARD, "copy_overlap": 1.5}}}))
    with pytest.raises(ValueError, match="bad.json: gpu 'X1': copy_overlap is a share, at most 1, got 1.5"):
        Catalog([bad])


def test_the_batch_line_of_the_best_run_carries_what_was_simulated(tmp_path):
    from seesaw.sim.planner import Candidate, batch_command
    from seesaw.sim.simulator import RunSpec

    cards = tmp_path / "cards.json"
    cards.write_text(json.dumps({"gpus": {"Small": {**_CARD, "memory_fraction": 0.8},
                                          "Fixed": {**_CARD, "kv_cache_gb": 3.0}}}))
    catalog = Catalog([cards])
    pair = Candidate(RunSpec.parse("p2-t2", host_buffer_gb=0.47))
    line = batch_command(pair, "llama3-8b", catalog.gpu("small"))
    assert "--prefill-layout p2 --decode-layout t2" in line and line.endswith("--host-buffer-gb 0.4 --memory-fraction 0.8")
    assert batch_command(pair, "llama3-8b", catalog.gpu("fixed")).endswith("--kv-cache-gb 3")


def test_host_memory_notes_say_when_shared_memory_would_not_hold_the_run():
    from seesaw.sim.planner import Candidate, host_memory_notes
    from seesaw.sim.simulator import RunSpec, simulate

    catalog = Catalog()
    cost = CostModel(catalog.model("llama3-8b"), catalog.node("2xL4", host_memory_gb=100))  # 15 GiB of weights
    work = fixed(8, 64, 8)

    def notes(run: str, buffer_gb: float) -> list[str]:
        spec = RunSpec.parse(run, host_buffer_gb=buffer_gb)
        return host_memory_notes(Candidate(spec, simulate(cost, spec, work)), cost)

    assert notes("t2", 40.0) == []  # /dev/shm holds half of the 100 GiB
    assert notes("t2", 60.0) == ["it keeps 60 GiB in shared memory, the host KV buffer; /dev/shm holds 50 GiB on "
                                 "this node (Linux mounts it at half of RAM unless told otherwise)"]
    pair = notes("p2-t2", 40.0)  # re-sharding adds the weights
    assert len(pair) == 1 and pair[0].startswith("it keeps 55 GiB in shared memory, the host KV buffer and the weight")
    assert notes("t2-t2", 40.0) == []  # one layout: no weight store


def test_the_recommended_host_buffer_is_what_the_simulated_run_held_and_a_margin():
    from seesaw.sim.planner import evaluate, right_sized
    from seesaw.sim.simulator import RunSpec

    catalog = Catalog()
    cost = CostModel(catalog.model("llama3-8b"), catalog.node("2xL4", host_memory_gb=100))
    work = fixed(40, 300, 30)
    roomy = evaluate(cost, RunSpec.parse("p2-t2", host_buffer_gb=40.0, max_model_len=8192), work)
    held_gib = roomy.result.host_peak_fraction * 40.0
    sized = right_sized(cost, roomy, work)
    assert held_gib * 1.1 <= sized.spec.host_buffer_gb <= held_gib * 1.1 + 1.0  # a tenth more, and at least a full-length request
    assert sized.throughput >= 0.99 * roomy.throughput
    static = evaluate(cost, RunSpec.parse("t2", host_buffer_gb=8.0), work)
    assert right_sized(cost, static, work).spec.host_buffer_gb is None  # it never evicted: left to auto


_CARD = {"memory_gb": 48, "memory_bandwidth_gbs": 900, "peak_tflops": 180, "interconnect": "pcie4x16",
         "host_link": "pcie4x16", "host_memory_gb": 96}


def test_user_profiles_extend_the_catalog(tmp_path):
    extra = tmp_path / "mine.json"
    extra.write_text(json.dumps({"gpus": {"MyCard": {
        "memory_gb": 48, "memory_bandwidth_gbs": 900, "peak_tflops": 180, "interconnect": "pcie4x16",
        "host_link": "pcie4x16", "host_memory_gb": 96}}}))
    assert Catalog([extra]).node("4xmycard").gpu.memory_gb == 48


def test_bad_workload_lines_are_left_out_naming_the_line(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"input_len": 10, "output_len": 5}\n\n{"input_len": 0, "output_len": 5}\nnot json\n'
                    '[3]\n{"input_len": 7, "output_len": true}\n{"prompt_tokens": 7, "max_tokens": 3}\n')
    workload = from_jsonl(path)
    assert workload.lengths == ((10, 5), (7, 3))
    assert workload.left_out == (
        f"{path}, line 3: input_len must be a positive integer, got 0",
        f"{path}, line 4: not JSON (Expecting value)",
        f"{path}, line 5: expected an object with input_len and output_len",
        f"{path}, line 6: output_len must be a positive integer, got True",
    )
    assert within_context(workload, 100)[0].left_out == workload.left_out
    path.write_text('not json\n{"input_len": 1}\n')
    with pytest.raises(ValueError, match=r"w.jsonl: no requests \(2 bad lines; the first: .*line 1: not JSON"):
        from_jsonl(path)
    with pytest.raises(ValueError, match="fixed:INPUT:OUTPUT"):
        named("fixed:3000", 4)


def test_built_in_mixes_have_their_shape():
    chat, papers = sharegpt(2000), arxiv(2000)
    assert 0.8 < chat.num_prompt_tokens / chat.num_output_tokens < 1.25  # input about equal to output
    assert all(prompt + output <= 4096 for prompt, output in papers.lengths)
    assert papers.num_prompt_tokens > 10 * papers.num_output_tokens
    assert sharegpt(50, seed=1) == sharegpt(50, seed=1) != sharegpt(50, seed=2)


def test_every_layout_and_pair_of_a_node_is_a_candidate():
    catalog = Catalog()
    cost = CostModel(catalog.model("llama3-8b"), catalog.node("8xA10"))
    layouts = {str(layout) for layout in layouts_of(8, cost)}
    assert layouts == {"t8", "p8", "t4p2", "t2p4", "d2t4", "d2p4", "d2t2p2", "d4t2", "d4p2", "d8"}
    runs = candidates(cost, PlanOptions())
    assert len(runs) == 10 + 12 + 6 + 2  # static, then pairs with the same number of replicas
    assert all(run.decode_layout.dp == run.layout.dp for run in runs if run.is_seesaw)


def test_plan_ranks_runnable_candidates_and_explains_the_others():
    catalog = Catalog()
    cost = CostModel(catalog.model("codellama-34b"), catalog.node("4xL4"))
    ranked = plan(cost, arxiv(60), PlanOptions())
    runnable = [c for c in ranked if c.result is not None]
    assert [c.throughput for c in runnable] == sorted((c.throughput for c in runnable), reverse=True)
    assert any("d2t2" in c.name and "no room for KV" in c.error for c in ranked if c.error)
    assert best(ranked, True).spec.is_seesaw and not best(ranked, False).spec.is_seesaw


def test_plan_command_prints_the_ranking_and_the_flags(tmp_path):
    output = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--model", "llama3-8b", "--gpus", "2xL4", "--workload", "arxiv",
                                      "--num-requests", "40", "--jobs", "1", "--output-json", str(output)])
    assert result.exit_code == 0, result.output
    assert "best static:" in result.output and "best pair:" in result.output
    assert "GiB for pairs (auto, as the engine sizes it on such a node)" in result.output
    assert "chosen: t2 (static layout)" in result.output and "runner-up: p2->t2 (the best pair)" in result.output
    assert "seesaw-cli batch INPUT.jsonl --model dummy:llama3-8b --device cuda --layout t2" in result.output
    assert "--host-buffer-gb" not in result.output  # t2 evicts nothing: auto sizes its buffer
    ranking = json.loads(output.read_text())["ranking"]
    assert {row["run"] for row in ranking} == {"t2", "p2", "d2", "t2->p2", "p2->t2"}


def test_plan_with_a_shared_system_prompt_says_so_and_ranks_what_was_simulated():
    result = CliRunner().invoke(app, ["plan", "--model", "llama3-8b", "--gpus", "2xL4", "--workload", "fixed:32:16",
                                      "--num-requests", "40", "--shared-prefix", "1024", "--jobs", "1"])
    assert result.exit_code == 0, result.output
    assert "mean input 1056 tokens, 1024 of them shared by every prompt" in result.output
    assert "chosen:" in result.output


@pytest.mark.parametrize("flags, message", [
    (["--gpus", "8xB200"], "unknown GPU 'B200'"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be at least 1, got 0"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1, got 0"),
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--host-buffer-gb", "-1"], "--host-buffer-gb must be at least 0, got -1.0"),
    (["--shared-prefix", "-5"], "--shared-prefix must not be negative, got -5"),
    (["--output-json", "{tmp}/missing/plan.json"], "--output-json {tmp}/missing/plan.json: the folder {tmp}/missing does not exist"),
])
def test_plan_command_bad_input_is_one_line_and_exit_code_2(flags, message, tmp_path):
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    message = message.format(tmp=tmp_path)
    result = CliRunner().invoke(app, ["plan", "--model", "llama3-8b", "--gpus", "2xL4", *flags])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")


def test_requests_longer_than_the_context_are_left_out_and_said_so(tmp_path):
    kept, refused = within_context(Workload("w", ((100, 10), (4000, 97), (4000, 96))), 4096)
    assert kept.lengths == ((100, 10), (4000, 96)) and refused == 1
    path = tmp_path / "w.jsonl"
    path.write_text('{"input_len": 4000, "output_len": 200}\n{"input_len": 100, "output_len": 20}\n' + "x\n" * 7)
    ranking = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--model", "llama2-70b", "--gpus", "8xL4", "--workload", str(path),
                                      "--jobs", "1", "--top", "1", "--output-json", str(ranking)])
    assert result.exit_code == 0, result.output
    assert "left out: 1 requests longer than the model's context of 4096 tokens" in result.stderr
    # bad lines too, the first five named, as batch goes on past them
    assert "left out: 7 bad lines of" in result.stderr and "and 2 more" in result.stderr
    assert f"{path}, line 7: not JSON" in result.stderr and f"{path}, line 8" not in result.stderr
    written = json.loads(ranking.read_text())
    assert written["left_out"]["longer_than_context"] == 1 and len(written["left_out"]["bad_lines"]) == 7
    assert written["best"] == written["ranking"][0]["run"] and written["command"] in result.stdout
    assert "w.jsonl: 1 requests" in result.stdout
    path.write_text('{"input_len": 4000, "output_len": 200}\n')
    result = CliRunner().invoke(app, ["plan", "--model", "llama2-70b", "--gpus", "8xL4", "--workload", str(path)])
    assert result.exit_code == 2 and "fits the model's context of 4096 tokens" in result.stderr


def test_plan_options_refuse_values_no_run_can_take():
    for fields in ({"token_budget": 0}, {"max_num_seqs": 0}, {"block_size": 0}, {"host_buffer_gb": -1.0},
                   {"host_low_water": 1.5}):
        with pytest.raises(ValueError, match=next(iter(fields))):
            PlanOptions(**fields)
    with pytest.raises(ValueError, match="jobs"):
        plan(CostModel(Catalog().model("tiny"), Catalog().node("2xL4")), arxiv(4), jobs=0)


@pytest.mark.parametrize("workers", ["0", "1,0", "x", ""])
def test_calibrate_refuses_worker_counts_before_measuring(workers, tmp_path):
    profile = tmp_path / "profile.json"
    result = CliRunner().invoke(app, ["calibrate", "--workers", workers, "--output", str(profile)])
    assert result.exit_code == 2 and "give positive worker counts" in result.output
    assert not profile.exists()


def test_plan_draws_the_best_pairs_timeline_or_with_none_the_best_layouts(tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "timeline.png"
    result = CliRunner().invoke(app, ["plan", "--model", "llama3-8b", "--gpus", "2xA10", "--workload", "fixed:1000:100",
                                      "--num-requests", "30", "--jobs", "1", "--timeline", str(picture)])
    assert result.exit_code == 0, result.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture.unlink()
    result = CliRunner().invoke(app, ["plan", "--model", "llama3-8b", "--gpus", "1xA10", "--workload", "fixed:1000:100",
                                      "--num-requests", "30", "--jobs", "1", "--timeline", str(picture)])
    assert result.exit_code == 0, result.output
    assert "timeline of t1 (no prefill->decode pair runs here)" in result.stdout
    assert "for static layouts (auto" in result.stdout and "for pairs" not in result.stdout
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_lines_are_measured_by_the_tokenizer_hook(tmp_path):
    path = tmp_path / "batch.jsonl"
    path.write_text('{"prompt": "a b c", "max_tokens": 7}\n{"input_len": 4, "output_len": 2}\n')
    seen = []

    def tokenize(entry: dict, where: str) -> tuple[int, int]:
        seen.append(where)
        return len(entry["prompt"].split()), entry["max_tokens"]

    assert from_jsonl(path, tokenize).lengths == ((3, 7), (4, 2))
    assert seen == [f"{path}, line 1"]


def test_a_batch_lines_default_max_tokens_is_fitted_to_the_context_and_an_explicit_one_is_kept():
    from seesaw.frontend.batch_lengths import batch_line_lengths

    default = {"prompt": [5] * 100}  # lines of token ids need no tokenizer
    explicit = {"prompt": [5] * 100, "max_tokens": 300}
    assert batch_line_lengths(default, "line 1", None, max_model_len=4096) == (100, 256)
    assert batch_line_lengths(default, "line 1", None, max_model_len=300) == (100, 200)
    assert batch_line_lengths(explicit, "line 2", None, max_model_len=300) == (100, 300)  # the engine refuses it


def test_batch_lines_are_measured_with_the_models_own_tokenizer_when_its_folder_has_one(tmp_path):
    from seesaw.config import default_cache_dir
    from seesaw.model.resolve import resolve_model
    from seesaw.frontend.batch_lengths import codec_for

    default_tokenizer = resolve_model("default", default_cache_dir()).tokenizer_folder
    said = []
    assert codec_for("llama2-70b", said.append).vocab_size == 49152  # a profile name: the default's (SmolLM2)
    assert "default model's tokenizer" in said[-1]
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert codec_for(str(folder), said.append).vocab_size == 49152  # no tokenizer there either
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((default_tokenizer / name).read_bytes())
    tokens = json.loads((folder / "tokenizer.json").read_text())
    tokens["added_tokens"].append({"id": 49152, "content": "<extra>", "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tokens))
    assert codec_for(str(folder), said.append).vocab_size == 49153 and str(folder) in said[-1]


def _die(*args):
    os._exit(1)  # as the kernel's out-of-memory killer would end it


def test_a_simulation_process_that_dies_is_one_clear_error(monkeypatch):
    from seesaw.sim import planner

    monkeypatch.setattr(planner, "evaluate", _die)
    cost = CostModel(Catalog().model("tiny"), Catalog().node("2xL4"))
    with pytest.raises(RuntimeError, match="ended abruptly .* with 4 requests and 2 jobs"):
        plan(cost, arxiv(4), jobs=2)
