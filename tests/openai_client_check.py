"""Drives a running router with the official OpenAI Python client, unchanged, and prints what
it saw as one JSON object. Used by tests/openai_client.rs.

usage: openai_client_check.py BASE_URL API_KEY MODEL
"""
import json
import sys

import openai

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
out = {"openai_version": openai.__version__}

out["models"] = [m.id for m in client.models.list()]

chat = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    max_tokens=24,
    temperature=0.7,
)
out["chat"] = {
    "id": chat.id,
    "object": chat.object,
    "content": chat.choices[0].message.content,
    "role": chat.choices[0].message.role,
    "finish_reason": chat.choices[0].finish_reason,
    "usage": chat.usage.model_dump() if chat.usage else None,
}

pieces, finish, usage, ids, roles = [], None, None, set(), []
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Name three primary colours."}],
    max_tokens=24,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    ids.add(chunk.id)
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        if choice.delta.role:
            roles.append(choice.delta.role)
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
out["stream"] = {"ids": sorted(ids), "content": "".join(pieces), "chunks": len(pieces),
                 "finish_reason": finish, "usage": usage, "roles": roles}

completion = client.completions.create(model=model, prompt="The sky is", max_tokens=8)
out["completion"] = {"id": completion.id, "text": completion.choices[0].text,
                     "usage": completion.usage.model_dump() if completion.usage else None}

text_stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, stream=True)
out["completion_stream"] = "".join(c.choices[0].text for c in text_stream if c.choices)

# Two choices with a seed, answered at once and then streamed: the same two texts.
question = [{"role": "user", "content": "Suggest a name for a cat."}]
both = client.chat.completions.create(model=model, messages=question, max_tokens=12, n=2, seed=5,
                                      temperature=0.9)
by_index = {}
for chunk in client.chat.completions.create(model=model, messages=question, max_tokens=12, n=2,
                                            seed=5, temperature=0.9, stream=True):
    for choice in chunk.choices:
        by_index.setdefault(choice.index, []).append(choice.delta.content or "")
out["choices"] = {
    "answered": [c.message.content for c in sorted(both.choices, key=lambda c: c.index)],
    "streamed": ["".join(by_index.get(i, [])) for i in range(2)],
}

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    out["unknown_model"] = None
except openai.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "code": e.code}

try:
    openai.OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0).models.list()
    out["bad_key"] = None
except openai.AuthenticationError as e:
    out["bad_key"] = {"status": e.status_code, "code": e.code}

print(json.dumps(out))
