"""Drive `llada serve` with the unmodified `openai` client: complete, chat and stream.

usage: serve_openai.py BASE_URL EXPECTED_COMPLETION_TEXT EXPECTED_CHAT_TEXT
(run by tests/serve.rs, which starts the server with --api-key k and computes the expected
texts with `llada generate`)."""
import sys

import openai

base, want_text, want_chat = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base, api_key="k", max_retries=0, timeout=120)
model = client.models.list().data[0].id

c = client.completions.create(model=model, prompt="Hello world", temperature=0)
assert c.choices[0].text == want_text, (c.choices[0].text, want_text)
assert c.usage.prompt_tokens > 0 and c.usage.completion_tokens <= 16, c.usage

c = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hi there"}], temperature=0
)
assert c.choices[0].message.content == want_chat, (c.choices[0].message.content, want_chat)
assert c.choices[0].message.role == "assistant"

text = "".join(
    ch.choices[0].text
    for ch in client.completions.create(model=model, prompt="Hello world", stream=True)
    if ch.choices
)
assert text == want_text, (text, want_text)
chat = "".join(
    ch.choices[0].delta.content or ""
    for ch in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi there"}], stream=True
    )
    if ch.choices
)
assert chat == want_chat, (chat, want_chat)

# Extra LLaDA settings go through extra_body; errors surface as the client's exceptions.
c = client.completions.create(
    model=model, prompt="Hello world", max_tokens=8, extra_body={"steps": 4, "block_length": 4}
)
assert c.usage.nfe == 4, c.usage
try:
    client.completions.create(model="no-such-model", prompt="x")
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError:
    pass
try:
    client.completions.create(model=model, prompt="x", extra_body={"steps": 3})
    raise SystemExit("impossible settings were accepted")
except openai.BadRequestError:
    pass
bad = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
try:
    bad.models.list()
    raise SystemExit("a wrong API key was accepted")
except openai.AuthenticationError:
    pass
print("openai client: ok")
