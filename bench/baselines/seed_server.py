"""The seeds' serving design, as the baseline: transformers `generate()` in float32 (`low_cpu_mem_usage`),
one request at a time behind a lock, streamed with `TextIteratorStreamer` as OpenAI-style SSE.

    python -m bench.baselines.seed_server --model DIR --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def build_app(model_dir: str, threads: int) -> FastAPI:
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, low_cpu_mem_usage=True).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        inputs = tok(text, return_tensors="pt", add_special_tokens=False)
        max_new = int(body.get("max_tokens") or 256)
        temperature = float(body.get("temperature", 1.0))
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**inputs, max_new_tokens=max_new, streamer=streamer, do_sample=temperature > 0)
        if temperature > 0:
            kwargs["temperature"] = temperature
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_new
        counted = {"n": 0}

        def work():
            with lock, torch.no_grad():  # one request at a time
                out = model.generate(**kwargs)
                counted["n"] = out.shape[1] - inputs["input_ids"].shape[1]

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        cid = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())

        def chunk(delta, finish=None):
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                          "model": "seed", "choices": [{"index": 0, "delta": delta,
                                                                        "finish_reason": finish}]}) + "\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            loop = asyncio.get_running_loop()
            it = iter(streamer)
            while True:
                piece = await loop.run_in_executor(None, next, it, None)
                if piece is None:
                    break
                if piece:
                    yield chunk({"content": piece})
            await loop.run_in_executor(None, thread.join)
            yield chunk({}, "length")
            usage = {"prompt_tokens": int(inputs["input_ids"].shape[1]), "completion_tokens": counted["n"],
                     "total_tokens": int(inputs["input_ids"].shape[1]) + counted["n"]}
            yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                         "model": "seed", "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        parts = []
        async for e in events():
            parts.append(e)
        return JSONResponse({"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": "".join(
                                 json.loads(p[6:])["choices"][0]["delta"].get("content", "")
                                 for p in parts if p.startswith("data: {") and json.loads(p[6:])["choices"])}}]})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    uvicorn.run(build_app(a.model, a.threads), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
