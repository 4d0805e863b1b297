"""`draftdata prompts`: the base model writes user prompts (Magpie-style), `synthesize` answers them.

The model is the tiny random Llama of conftest, first taught (a few seconds of Adam) to write one
of five short user messages after `<|im_start|>user\\n`: so what it samples is known, the five
distinct texts bound how many unique prompts exist, and everything else is the real code path.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from openai_server import OddServer

from draftdata.cli import main
from draftdata.errors import DraftdataError

USER_TEXTS = ["What is 12 plus 30?", "Write a short poem about the sea.", "The quick brown fox jumps over the lazy dog.",
              "Speculative decoding drafts tokens with a small model.", "hello world numbers 0 1 2 3 4 5"]


@pytest.fixture(scope="module")
def user_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model, trained to continue `<|im_start|>user\\n` with one of USER_TEXTS and <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("user_model")
    shutil.copytree(tiny_model, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in USER_TEXTS]
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in rows]
    width = max(map(len, ids))
    batch = torch.full((len(ids), width), tok.pad_token_id)
    labels = torch.full((len(ids), width), -100)
    for i, row in enumerate(ids):
        batch[i, :len(row)] = torch.tensor(row)
        labels[i, :len(row)] = torch.tensor(row)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        loss = model(input_ids=batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, loss.item()
    model.eval().save_pretrained(path, safe_serialization=True)
    return path


def run_cli(*args) -> int:
    return main(["prompts", *map(str, args)])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_model_writes_user_prompts_that_synthesize_answers(user_model, tmp_path, capsys):
    out = tmp_path / "prompts.jsonl"
    assert run_cli("--model", user_model, "--output", out, "--count", 3, "--max-new-tokens", 40) == 0
    got = records(out)
    assert len(got) == 3
    texts = [r["conversations"][0]["content"] for r in got]
    assert all(len(r["conversations"]) == 1 and r["conversations"][0]["role"] == "user" for r in got)
    assert set(texts) <= set(USER_TEXTS) and len(set(texts)) == 3  # what it was taught, no repeats
    assert all(re.fullmatch(r"self-0-\d{7}", r["conversation_id"]) for r in got)
    summary = capsys.readouterr().out
    assert "written    3 prompts" in summary
    settings = json.loads((tmp_path / "prompts.jsonl.synth" / "settings.json").read_text())
    assert settings["identity"]["command"] == "prompts" and settings["identity"]["temperature"] == 1.0

    # the output is synthesize input: every prompt gets the model's answer
    answered = tmp_path / "answered.jsonl"
    assert main(["synthesize", "--model", str(user_model), "--input", str(out), "--output", str(answered),
                 "--max-new-tokens", "8"]) == 0
    done = {r["conversation_id"]: r["conversations"] for r in records(answered)}
    assert set(done) == {r["conversation_id"] for r in got}
    assert all([m["role"] for m in conv] == ["user", "assistant"] for conv in done.values())


def test_duplicates_are_rejected_and_attempts_are_bounded(user_model, tmp_path, capsys):
    out = tmp_path / "prompts.jsonl"
    # only five distinct texts exist: asking for eight ends after --max-attempts with exit status 1
    assert run_cli("--model", user_model, "--output", out, "--count", 8, "--max-attempts", 24,
                   "--max-new-tokens", 40, "--batch-size", 4) == 1
    texts = [r["conversations"][0]["content"] for r in records(out)]
    assert 3 <= len(texts) <= 5 and len(set(texts)) == len(texts)
    captured = capsys.readouterr()
    assert re.search(r"rejected   \d+ of 24 samples: duplicate \d+", captured.out)
    assert f"only {len(texts)} of 8 prompts after 24 samples" in captured.err

    # every sample cut at the token limit: rejected as too_long, and the message says what to raise
    short = tmp_path / "short.jsonl"
    assert run_cli("--model", user_model, "--output", short, "--count", 2, "--max-new-tokens", 2) == 1
    assert short.read_text() == ""
    err = capsys.readouterr().err
    assert "most were rejected as too_long: nothing was kept, so a rerun with these settings draws the same " \
        "samples again: raise --max-new-tokens" in err and "rerun to continue" not in err


def test_rerun_continues_to_count_and_other_settings_are_refused(user_model, tmp_path, capsys):
    out = tmp_path / "prompts.jsonl"
    common = ["--model", user_model, "--output", out, "--max-new-tokens", 40]
    assert run_cli(*common, "--count", 2, "--batch-size", 1) == 0
    first = out.read_text()
    assert run_cli(*common, "--count", 4, "--batch-size", 3) == 0
    text = out.read_text()
    assert text.startswith(first) and len(text.splitlines()) == 4  # appended, nothing rewritten
    got = records(out)
    assert len({r["conversation_id"] for r in got}) == 4
    assert len({r["conversations"][0]["content"] for r in got}) == 4  # no repeat of the first run's prompts
    first_ids = max(int(r["conversation_id"].rsplit("-", 1)[1]) for r in records_of(first))
    assert all(int(r["conversation_id"].rsplit("-", 1)[1]) > first_ids for r in got[2:])
    assert "already holds 2 prompts; writing 2 more" in capsys.readouterr().err
    assert run_cli(*common, "--count", 4) == 0 and out.read_text() == text  # nothing left to do
    assert run_cli(*common, "--count", 6, "--temperature", 0.5) == 2  # one error line, exit 2
    assert "temperature: file has 1.0, this run has 0.5" in capsys.readouterr().err
    assert out.read_text() == text
    # a hand-added line the resume cannot read: one line naming it (an AttributeError traceback)
    out.write_text(text + json.dumps({"conversation_id": "hand-1", "conversations": [
        {"role": "user", "content": None}]}) + "\n")
    assert run_cli(*common, "--count", 6) == 2
    assert f"{out}:5: a user message's content is NoneType, not text" in capsys.readouterr().err


def test_a_rerun_from_any_written_prefix_ends_as_an_uninterrupted_run(user_model, tmp_path, capsys):
    """Samples are judged in index order also with continuous batching, so whatever prefix of the
    file a kill leaves, the rerun writes what the uninterrupted run did (a lower index still being
    generated when a higher one was written used to be skipped by the rerun, and replaced)."""
    common = ["--model", user_model, "--count", 10, "--batch-size", 4, "--max-new-tokens", 40, "--seed", 3]
    full = tmp_path / "full.jsonl"
    assert run_cli(*common, "--output", full) == 0
    wide = ["--model", user_model, "--count", 8, "--batch-size", 8, "--max-new-tokens", 60, "--seed", 11,
            "--temperature", 1.3]
    capsys.readouterr()
    assert run_cli(*wide, "--output", tmp_path / "wide.jsonl") == 0
    rejected, drawn = map(int, re.search(r"rejected\s+(\d+) of (\d+) samples", capsys.readouterr().out).groups())
    assert drawn == 8 + rejected                             # every sample drawn was judged: none wasted
    lines = full.read_text().splitlines(keepends=True)
    indices = [int(r["conversation_id"].rsplit("-", 1)[1]) for r in records(full)]
    assert indices == sorted(indices)                        # written in index order
    for k in (1, 4, 7):
        cut = tmp_path / f"cut{k}.jsonl"
        shutil.copytree(tmp_path / "full.jsonl.synth", tmp_path / f"cut{k}.jsonl.synth")
        cut.write_text("".join(lines[:k]))
        assert run_cli(*common, "--output", cut) == 0
        assert cut.read_text() == full.read_text(), k


def records_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_each_prompt_is_sampled_from_its_own_seed(user_model, tmp_path):
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    assert run_cli("--model", user_model, "--output", one, "--count", 4, "--batch-size", 1,
                   "--max-new-tokens", 40, "--seed", 7) == 0
    assert run_cli("--model", user_model, "--output", many, "--count", 4, "--batch-size", 8,
                   "--max-new-tokens", 40, "--seed", 7) == 0
    a = {r["conversation_id"]: r["conversations"] for r in records(one)}
    b = {r["conversation_id"]: r["conversations"] for r in records(many)}
    shared = set(a) & set(b)
    assert shared and all(a[k] == b[k] for k in shared)  # an index writes the same text in any batch
    assert all(k.startswith("self-7-") for k in a)


def test_user_prefixes_open_the_prompts_in_turn(user_model, user_server, tmp_path, capsys):
    """--user-prefix: prompt i continues the (i mod n)-th opening words, locally and via --endpoint
    (whose requests carry the template prefix followed by those words)."""
    from draftdata.collect.self_prompts import PromptFormat, query_prefix

    prefixes = ["Write a", "What is"]
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    flags = ["--count", 3, "--max-new-tokens", 40, "--seed", 5, "--max-attempts", 60, "--min-chars", 4,
             *[x for p in prefixes for x in ("--user-prefix", p)]]
    assert run_cli("--model", user_model, "--dtype", "fp32", "--output", local, "--batch-size", 1, *flags) == 0
    got = records(local)
    assert len(got) == 3  # the tiny model knows one text per prefix: the third is a variant of one
    for r in got:
        index = int(r["conversation_id"].rsplit("-", 1)[1])
        assert r["conversations"][0]["content"].startswith(prefixes[index % 2]), r
    taught = {t for t in USER_TEXTS if t.startswith(tuple(prefixes))}
    assert taught & {r["conversations"][0]["content"] for r in got}  # the model finishes what it was taught
    settings = json.loads((tmp_path / "local.jsonl.synth" / "settings.json").read_text())
    assert settings["identity"]["user_prefixes"] == prefixes

    user_server.requests.clear()
    assert run_cli("--endpoint", user_server.url, "--tokenizer", user_model, "--concurrency", 2,
                   "--output", remote, *flags) == 0
    assert records(remote) == got
    fmt = PromptFormat(str(user_model))
    assert {tuple(r["prompt"]) for r in user_server.requests} == {tuple(query_prefix(fmt, None, p)) for p in prefixes}

    capsys.readouterr()
    assert run_cli("--model", user_model, "--output", local, "--count", 8, "--user-prefix", "Tell me") == 2
    assert "user_prefixes: file has ['Write a', 'What is'], this run has ['Tell me']" in capsys.readouterr().err
    assert run_cli("--model", user_model, "--output", tmp_path / "x.jsonl", "--count", 1, "--user-prefix", " ") == 2
    assert "--user-prefix must not be empty" in capsys.readouterr().err


def test_prefix_bad_templates_and_settings(user_model, tmp_path):
    from draftdata.collect.self_prompts import PromptSettings, query_prefix
    from draftdata.collect.synthesize import HFGenerator

    gen = HFGenerator(user_model, max_new_tokens=4, dtype="fp32")
    assert gen.tokenizer.decode(query_prefix(gen)) == "<|im_start|>user\n"
    assert gen.tokenizer.decode(query_prefix(gen, "Be brief.")) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    upper = tmp_path / "upper.jinja"
    upper.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
                     "{% endfor %}")
    with pytest.raises(DraftdataError, match="does not render a user message's text verbatim"):
        query_prefix(HFGenerator(user_model, chat_template=upper.read_text()))
    with pytest.raises(DraftdataError, match="--temperature must be > 0"):
        PromptSettings(model="m", model_path=str(user_model), output="x", count=1, temperature=0.0)
    with pytest.raises(DraftdataError, match="--max-attempts 1 is below --count 2"):
        PromptSettings(model="m", model_path=str(user_model), output="x", count=2, max_attempts=1)


# ------------------------------------------------------------------ --endpoint (OpenAI-compatible /v1/completions)

@pytest.fixture(scope="module")
def user_server(user_model):
    from openai_server import ChatServer

    server = ChatServer(user_model, name="user-llama")
    yield server
    server.close()


def test_endpoint_writes_what_local_sampling_writes(user_model, user_server, tmp_path, capsys):
    from draftdata.collect.self_prompts import PromptFormat, query_prefix
    from draftdata.collect.synthesize import turn_seed

    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    flags = ["--count", 4, "--max-new-tokens", 40, "--seed", 3, "--temperature", 1.0]
    # one row at a time locally, in the server's dtype: samples are judged in index order, as the
    # endpoint path judges them
    assert run_cli("--model", user_model, "--dtype", "fp32", "--output", local, "--batch-size", 1, *flags) == 0
    user_server.requests.clear()
    assert run_cli("--endpoint", user_server.url, "--tokenizer", user_model, "--concurrency", 3,
                   "--output", remote, *flags) == 0
    assert records(remote) == records(local)  # same ids, same texts, same order
    sent = user_server.requests
    fmt = PromptFormat(str(user_model))
    assert {tuple(r["prompt"]) for r in sent} == {tuple(query_prefix(fmt))}
    assert {r["model"] for r in sent} == {"user-llama"} and {r["max_tokens"] for r in sent} == {40}
    assert sorted(r["seed"] for r in sent) == sorted(turn_seed(3, f"self-{i}", 0) for i in range(len(sent)))
    assert all(r["stop_token_ids"] == sorted(fmt.stop_ids) and r["skip_special_tokens"] is False for r in sent)
    settings = json.loads((tmp_path / "remote.jsonl.synth" / "settings.json").read_text())["identity"]
    assert settings["model_id"] == "user-llama" and settings["endpoint"] == user_server.url
    assert "written    4 prompts" in capsys.readouterr().out

    # a rerun continues; a server that runs past the end of turn is cut where the turn ended
    user_server.completion_suffix = "<|im_end|>\n<|im_start|>assistant\nSure!"
    try:
        assert run_cli("--endpoint", user_server.url, "--tokenizer", user_model, "--output", remote,
                       *flags[:1], 5, *flags[2:]) == 0
    finally:
        user_server.completion_suffix = ""
    assert run_cli("--model", user_model, "--dtype", "fp32", "--output", local, "--batch-size", 1, *flags[:1], 5,
                   *flags[2:]) == 0
    assert len(records(remote)) == 5 and records(remote) == records(local)


def test_endpoint_stop_cuts_off_requests_in_flight(user_model, tmp_path):
    """Ctrl-C during `prompts --endpoint` held the exit until every request under way was answered
    (the pool's threads are joined at exit; up to --request-timeout, 600 s by default)."""
    server = OddServer(hang=90)
    server.hang_all = True
    try:
        proc = subprocess.Popen([sys.executable, "-m", "draftdata.cli", "prompts", "--endpoint", server.url,
                                 "--tokenizer", str(user_model), "--output", str(tmp_path / "p.jsonl"),
                                 "--count", "4", "--concurrency", "2"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while server.posts < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 20 and proc.returncode == 130, err[-2000:]
    finally:
        server.close()


def test_a_stopped_run_prints_and_writes_its_summary(user_model, tmp_path):
    """Ctrl-C or SIGTERM kept the prompts written, but printed no summary and wrote no
    prompts-summary-*.json (synthesize and collect do both); SIGTERM killed the run at once."""
    out = tmp_path / "p.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "draftdata.cli", "prompts", "--model", str(user_model),
                             "--output", str(out), "--count", "3000", "--max-new-tokens", "40", "--dtype", "fp32",
                             "--batch-size", "4", "--max-attempts", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped early" in err, err[-2000:]
    assert "prompts summary" in stdout, stdout
    (summary,) = (tmp_path / "p.jsonl.synth").glob("prompts-summary-*.json")
    assert summary.name.endswith(f"-{proc.pid}.json")  # two runs ending in one second keep both summaries
    assert json.loads(summary.read_text())["stopped_early"] is True
    stats = json.loads(summary.read_text())["stats"]          # every sample is kept, rejected, or said unjudged
    rejected = sum(stats["rejected"].values())
    unjudged = stats["attempts"] - stats["written"] - rejected
    assert unjudged == 0 or f"({unjudged:,} more were in flight when the run stopped, not judged)" in stdout, stdout


def test_endpoint_special_tokens_errors_and_settings(user_model, user_server, tmp_path, capsys, monkeypatch):
    # a special token inside the text (the model wrote past the user's turn): template_token
    out = tmp_path / "prompts.jsonl"
    user_server.completion_suffix = " <|im_start|>"
    try:
        assert run_cli("--endpoint", user_server.url + "/v1/completions", "--tokenizer", user_model, "--output", out,
                       "--count", 2, "--max-attempts", 4, "--max-new-tokens", 40) == 1
    finally:
        user_server.completion_suffix = ""
    assert out.read_text() == ""
    assert re.search(r"rejected   4 of 4 samples: template_token 4", capsys.readouterr().out)

    # HTTP 503 is retried; the API key is sent and never written down
    monkeypatch.setenv("DRAFTDATA_API_KEY", "sekret")
    user_server.requests.clear()
    user_server.flaky, user_server.flaky_failed = True, False
    try:
        assert run_cli("--endpoint", user_server.url, "--tokenizer", user_model, "--output", tmp_path / "k.jsonl",
                       "--count", 1, "--max-new-tokens", 40) == 0
    finally:
        user_server.flaky = False
    assert user_server.flaky_failed and {r["auth"] for r in user_server.requests} == {"Bearer sekret"}
    assert "sekret" not in "".join(p.read_text() for p in (tmp_path / "k.jsonl.synth").iterdir())
    assert run_cli("--endpoint", user_server.url, "--tokenizer", user_model, "--output", tmp_path / "k.jsonl",
                   "--count", 2, "--max-new-tokens", 40, "--seed", 9) == 2  # other settings: refused
    assert "seed: file has 0, this run has 9" in capsys.readouterr().err

    # a sample the server's content filter cut is one dropped sample (other seeds pass), not a stop
    user_server.filter_completions = 1
    try:
        assert run_cli("--endpoint", user_server.url, "--tokenizer", user_model, "--output", tmp_path / "f.jsonl",
                       "--count", 2, "--max-new-tokens", 40) == 0
    finally:
        user_server.filter_completions = 0
    assert len((tmp_path / "f.jsonl").read_text().splitlines()) == 2
    assert "content_filter 1" in capsys.readouterr().out

    # a server that refuses the request format stops the run at once with what it said
    user_server.reject_completions = True
    try:
        assert run_cli("--endpoint", user_server.url, "--tokenizer", user_model, "--output", tmp_path / "r.jsonl",
                       "--count", 3) == 2
    finally:
        user_server.reject_completions = False
    err = capsys.readouterr().err
    assert "HTTP 400: unknown field stop_token_ids (test)" in err and "stop_token_ids" in err
    assert run_cli("--endpoint", user_server.url, "--model", "nope", "--tokenizer", user_model,
                   "--output", tmp_path / "n.jsonl", "--count", 1) == 2
    assert "HTTP 404: model 'nope' does not exist" in capsys.readouterr().err
    assert run_cli("--endpoint", user_server.url, "--output", tmp_path / "t.jsonl", "--count", 1) == 2
    assert "--endpoint needs --tokenizer" in capsys.readouterr().err
    assert run_cli("--endpoint", user_server.url, "--tokenizer", user_model, "--output", tmp_path / "t.jsonl",
                   "--count", 1, "--retries", -1) == 2
    assert "--retries must be >= 0" in capsys.readouterr().err


def test_output_without_settings_warns_naming_prompts(tiny_model, tmp_path, capsys):
    out = tmp_path / "mine.jsonl"
    out.write_text(json.dumps({"conversation_id": "mine-1", "conversations": [{"role": "user", "content": "hi"}]})
                   + "\n" + '{"conversation_id": "mine-2", "conv')  # written elsewhere, torn last line
    assert run_cli("--model", tiny_model, "--output", out, "--count", 1) == 0  # already enough: nothing to do
    err = capsys.readouterr().err
    assert "draftdata prompts: " in err and "removed a torn last line" in err
    assert f"draftdata prompts: {out} has no settings.json" in err and "synthesize" not in err, err
    out.write_text("not json\n")
    assert run_cli("--model", tiny_model, "--output", out, "--count", 1) == 2
    assert f"{out}:1: not a record written by prompts" in capsys.readouterr().err


def test_follow_up_writes_the_next_user_turn_of_answered_conversations(user_model, user_server, tmp_path, capsys):
    """--follow-up: one sample per conversation that ends with an answer, written after it; records
    keep their id, messages and category; the same locally and via --endpoint; synthesize answers
    the new turn; a rerun has nothing left to do."""
    from draftdata.collect.self_prompts import PromptFormat, fold, query_prefix

    answer = "Sure, here it is."
    convs = [{"conversation_id": f"c{i}", "category": "math" if i == 0 else None,
              "conversations": [{"role": "user", "content": USER_TEXTS[i]}, {"role": "assistant", "content": answer}]}
             for i in range(4)]
    lines = [json.dumps(c) for c in convs] + [
        "not json",
        json.dumps({"conversation_id": "open", "conversations": [{"role": "user", "content": "Hi"},
                                                                {"role": "assistant", "content": answer},
                                                                {"role": "user", "content": "unanswered"}]}),
        json.dumps({"conversation_id": "long", "conversations": [{"role": "user", "content": "Tell me more."},
                                                                {"role": "assistant", "content": "word " * 1200}]})]
    answered = tmp_path / "answered.jsonl"
    answered.write_text("\n".join(lines) + "\n")
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    flags = ["--follow-up", answered, "--max-new-tokens", 40, "--seed", 4, "--min-chars", 4]
    assert run_cli("--model", user_model, "--dtype", "fp32", "--batch-size", 1, "--output", local, *flags) == 0
    got = records(local)
    assert len(got) >= 2, got
    given = {c["conversation_id"]: c for c in convs}
    for r in got:
        before = given[r["conversation_id"]]["conversations"]
        assert r["conversations"][:2] == before and len(r["conversations"]) == 3
        new = r["conversations"][2]
        assert new["role"] == "user" and fold(new["content"]) != fold(before[0]["content"]) and new["content"]
        assert r.get("category") == given[r["conversation_id"]]["category"]
    out = capsys.readouterr().out
    assert "input      2 records not continued: " in out and "malformed_json 1" in out and "not_answered 1" in out
    assert re.search(r"rejected   \d+ of 5 samples: .*too_long [1-9]", out), out  # "long" leaves no room
    assert json.loads((tmp_path / "local.jsonl.synth" / "settings.json").read_text())["identity"]["follow_up"] == \
        str(answered)

    user_server.requests.clear()
    assert run_cli("--endpoint", user_server.url, "--tokenizer", user_model, "--concurrency", 2,
                   "--output", remote, *flags) == 0
    assert records(remote) == got
    fmt = PromptFormat(str(user_model))
    assert {tuple(r["prompt"]) for r in user_server.requests} == \
        {tuple(query_prefix(fmt, history=given[f"c{i}"]["conversations"])) for i in range(4)}

    before = local.read_text()
    assert run_cli("--model", user_model, "--dtype", "fp32", "--output", local, *flags) == 0
    assert local.read_text() == before and "written    0 prompts" in capsys.readouterr().out
    partial = tmp_path / "partial.jsonl"   # a run stopped while earlier conversations were in flight
    shutil.copytree(tmp_path / "local.jsonl.synth", tmp_path / "partial.jsonl.synth")
    partial.write_text(before.splitlines(keepends=True)[-1])
    assert run_cli("--model", user_model, "--dtype", "fp32", "--output", partial, *flags) == 0
    key = lambda r: r["conversation_id"]  # noqa: E731
    assert sorted(records(partial), key=key) == sorted(got, key=key)  # the rerun continued them (it skipped them)
    one = tmp_path / "one.jsonl"
    assert run_cli("--model", user_model, "--dtype", "fp32", "--output", one, *flags, "--count", 1) == 0
    assert records(one) == got[:1] and "(1 of --count 1 in the file)" in capsys.readouterr().out

    turns = tmp_path / "turns.jsonl"
    assert main(["synthesize", "--model", str(user_model), "--input", str(local), "--output", str(turns),
                 "--max-new-tokens", "8", "--keep-answers"]) == 0
    first_three = {r["conversation_id"]: r["conversations"][:3] for r in records(turns)}
    assert first_three == {r["conversation_id"]: r["conversations"] for r in got}  # the first answers were kept
    assert {r["conversation_id"]: r.get("category") for r in records(turns)} == \
        {r["conversation_id"]: r.get("category") for r in got}  # and so were the categories
    assert all([m["role"] for m in r["conversations"]] == ["user", "assistant", "user", "assistant"]
               for r in records(turns))

    assert run_cli("--model", user_model, "--output", tmp_path / "s.jsonl", *flags, "--system-prompt", "Be brief.") == 2
    assert "--system-prompt does not go with --follow-up" in capsys.readouterr().err
    assert run_cli("--model", user_model, "--output", answered, *flags) == 2
    assert "is the --follow-up input" in capsys.readouterr().err
    (tmp_path / "open.jsonl").write_text(lines[5] + "\n")
    assert run_cli("--model", user_model, "--output", tmp_path / "o.jsonl", "--follow-up", tmp_path / "open.jsonl") == 2
    assert "no conversation ends with an assistant answer (not_answered 1)" in capsys.readouterr().err
    (tmp_path / "prompt_only.jsonl").write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]})
                                                + "\n")                 # prompts never answered: not_answered too
    assert run_cli("--model", user_model, "--output", tmp_path / "o.jsonl", "--follow-up",
                   tmp_path / "prompt_only.jsonl") == 2
    assert "(not_answered 1)" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    assert run_cli("--model", user_model, "--output", tmp_path / "o.jsonl", "--follow-up", missing) == 2
    assert f"error: --follow-up {missing}: no such file" in capsys.readouterr().err
    assert run_cli("--model", user_model, "--output", tmp_path / "o.jsonl") == 2
    assert "give --count N" in capsys.readouterr().err
    upper = tmp_path / "upper.jinja"  # a template that cannot continue any conversation fails once, up front
    upper.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
                     "{% endfor %}")
    assert run_cli("--model", user_model, "--output", tmp_path / "u.jsonl", *flags, "--chat-template", upper) == 2
    assert "does not render a user message's text verbatim" in capsys.readouterr().err


def test_a_run_that_keeps_nothing_says_what_to_change():
    """All samples rejected: the summary names the flag behind the most common reason."""
    from collections import Counter

    from draftdata.collect.self_prompts import PromptStats

    stats = PromptStats(attempts=3, rejected=Counter(too_long=2, too_short=1))
    text = stats.format("out.jsonl", "--count 3", 0)
    assert "  hint       no sample was kept: the model did not end its message within --max-new-tokens" in text
    assert text.splitlines()[-1] == "  output     out.jsonl"
    assert "hint" not in PromptStats(written=1, attempts=3, rejected=Counter(too_long=2)).format("o", "--count 3", 1)
