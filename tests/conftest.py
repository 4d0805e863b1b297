"""Shared test fixtures: a tiny random Llama with a real ChatML tokenizer, and a real S3 endpoint.

Nothing here mocks what is tested: the model is a real `LlamaForCausalLM` saved as safetensors,
the tokenizer a real byte-level BPE trained in the test, and S3 a moto server on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A shell's background job (`cmd &`, nohup) starts with SIGINT ignored, and so does every process it
# spawns: the Ctrl-C tests (which send SIGINT to the CLI and to themselves) need it delivered.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 plus 30? The answer is 42.",
    "Speculative decoding drafts tokens with a small model and verifies them with the base model.",
    "user assistant system hello world numbers 0 1 2 3 4 5 6 7 8 9",
    "Write a short poem about the sea. Waves roll in, waves roll out.",
]


def make_tiny_model(path: str | Path, *, num_layers: int = 4, hidden_size: int = 64,
                    tie_word_embeddings: bool = False, seed: int = 0) -> Path:
    """Write a tiny random LlamaForCausalLM + ChatML tokenizer to `path` and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        rope_theta=10000.0,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def overflowing_model(tiny_model: Path, dest: Path, word: str) -> Path:
    """The tiny model with the embedding row of `word` (one token) at 1e5: beyond fp16's range (65,504), inside fp32's
    and bf16's. Under --dtype fp16 the weights load as inf, as an overflowing base would compute."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(tiny_model, dest)
    (token,) = AutoTokenizer.from_pretrained(dest).encode(word, add_special_tokens=False)
    weights = load_file(str(dest / "model.safetensors"))
    weights["model.embed_tokens.weight"][token] = 1e5
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 4-layer, hidden-64 random Llama with a ChatML tokenizer (session-wide, read-only)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto's ThreadedMotoServer on 127.0.0.1 (random port)."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh bucket; yields (s3://bucket, storage_options)."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_server,
                                                                    "region_name": "us-east-1"}}
    yield f"s3://{name}", opts
