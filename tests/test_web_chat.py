"""The web chat page (`serve/static/index.html`) in headless Chromium, driven by selenium.

The server runs on 127.0.0.1 with a tiny random model; the test types into the page like a user
and checks the streamed reply against the engine's greedy output for the same conversation.
Needs Debian's browser and driver: `apt-get install -y chromium chromium-driver` and
`pip install selenium` (the `test` extra). Without them the tests fail and say so: they are
never skipped.

`python tests/test_web_chat.py CKPT OUT.png` serves a real checkpoint and saves a screenshot of a
short conversation (how docs/img/web-chat.png is made).
"""

from __future__ import annotations

import copy
import shutil
import sys

import pytest
import torch

from smolforge.chat.reasoning import split_reasoning
from smolforge.chat.render import render_messages
from smolforge.engine import Engine, SamplingParams
from smolforge.model import Transformer, debug

INSTALL = ("install Debian's headless browser and its driver with `apt-get install -y chromium "
           "chromium-driver`, and selenium with `pip install -e '.[test]'`")
TIMEOUT = 60  # seconds for any one wait in the page
MAX_TOKENS = 12

# A Qwen3-style template: with thinking on, the generation prompt opens the <think> block, so
# the reply starts as reasoning; with it off, an empty block is closed before the answer.
QWEN_STYLE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' ~ message.content ~ '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def find_browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or a test failure saying how to install them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path]
    if missing:
        pytest.fail(f"the web chat test needs {' and '.join(missing)} on PATH: {INSTALL}",
                    pytrace=False)
    return chromium, driver


def start_browser(width: int = 1200, height: int = 820):
    """A headless Chromium session (selenium WebDriver)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"the web chat test needs selenium: {INSTALL}", pytrace=False)
    chromium, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def printable_model(tokenizer) -> Transformer:
    """A random tiny model whose greedy replies are plain printable ASCII and never end early.

    The LM head (untied) is zeroed for special tokens, byte pieces of multi-byte characters and
    ids past the tokenizer: their logit is 0, below the largest of ~200 random ones, so greedy
    decoding never picks them and every reply streams token by token up to max_tokens.
    """
    torch.manual_seed(0)
    config = debug().model_copy(update={"vocab_size": 384, "init_std": 0.2, "max_seq_len": 512,
                                        "tie_embeddings": False})
    model = Transformer(config).eval()
    special = set(tokenizer.special_tokens)

    def plain(i: int) -> bool:
        text = tokenizer.decode([i])
        return bool(text) and text.isascii() and text.isprintable() and text not in special

    keep = torch.tensor([i < tokenizer.vocab_size and plain(i) for i in range(config.vocab_size)])
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0.0
    return model


@pytest.fixture(scope="module")
def served(tokenizer):
    """(url, engine, tokenizer) of a running server; the API key is "sesame"."""
    from smolforge.serve.app import RunningServer, create_app

    tok = copy.copy(tokenizer)
    tok.chat_template = QWEN_STYLE
    model = printable_model(tok)
    with RunningServer(create_app(model, tok, model_name="tiny-chat", api_key="sesame")) as server:
        yield server.url, Engine(model, tok), tok


@pytest.fixture(scope="module")
def browser():
    driver = start_browser()
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, TIMEOUT).until(lambda d: condition(d), message=f"waiting for {what}")


def open_page(driver, url: str, api_key: str | None = "sesame") -> None:
    """Load the page fresh (empty localStorage) and enter the API key."""
    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(url + "/")
    if api_key is not None:
        set_field(driver, "api-key", api_key)
        wait_for(driver, lambda d: d.find_element("id", "model").text.startswith("tiny-chat"),
                 "the model name")


def set_field(driver, element_id: str, value: str) -> None:
    """Type into a settings field as a user would (clear, type, leave: fires `change`)."""
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", element)


def send_message(driver, text: str) -> None:
    """Type `text` in the message box and press Enter."""
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("id", "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def last_reply(driver) -> dict:
    """The last assistant message once it has finished: state, content, reasoning, meta, error,
    and how many times its text changed while it streamed."""
    wait_for(driver, lambda d: d.execute_script(
        "const m = [...document.querySelectorAll('.message.assistant')].pop();"
        "return m && m.dataset.state !== 'streaming';"), "the reply to finish")
    return driver.execute_script("""
        const m = [...document.querySelectorAll('.message.assistant')].pop();
        const text = (sel) => { const e = m.querySelector(sel); return e ? e.textContent : null; };
        return {state: m.dataset.state, content: text('.content'), reasoning: text('.reasoning .text'),
                meta: text('.meta'), error: text('.error'), updates: window.updates || 0};
    """)


def count_updates(driver) -> None:
    """Count changes to the reply's text from now on (window.updates), to see it stream."""
    driver.execute_script("""
        window.updates = 0;
        new MutationObserver(() => { window.updates += 1; })
          .observe(document.getElementById('log'), {subtree: true, characterData: true, childList: true});
    """)


def greedy(engine: Engine, tok, messages: list[dict], thinking: bool) -> str:
    """The engine's greedy reply text for a conversation, as the server renders it."""
    prompt = render_messages(tok.chat_template, messages, add_generation_prompt=True,
                             enable_thinking=thinking)
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0,
                            stop_token_ids=[tok.token_to_id("<|im_end|>")])
    return engine.generate([tok.encode(prompt)], params)[0].text


def test_streamed_replies_equal_the_greedy_engine_output(served, browser):
    url, engine, tok = served
    open_page(browser, url)
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", str(MAX_TOKENS))
    set_field(browser, "system", "You answer in one line.")
    browser.find_element("id", "think").click()  # reasoning off
    assert not browser.find_element("id", "think").is_selected()

    count_updates(browser)
    send_message(browser, "the quick brown fox")
    first = last_reply(browser)
    system = {"role": "system", "content": "You answer in one line."}
    conversation = [system, {"role": "user", "content": "the quick brown fox"}]
    expected = greedy(engine, tok, conversation, thinking=False)
    reasoning, answer = split_reasoning(expected, in_think=False)
    assert first["state"] == "done" and first["error"] is None
    assert len(answer.strip()) >= 5 and first["content"] == answer and first["reasoning"] is None
    assert first["updates"] >= 5, "the reply arrived in one piece instead of streaming"
    assert f"{MAX_TOKENS} tokens" in first["meta"]

    # The second turn sends the history back (the first answer included) and reasoning is on.
    browser.find_element("id", "think").click()
    send_message(browser, "jumps over the lazy dog")
    second = last_reply(browser)
    conversation += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": "jumps over the lazy dog"}]
    expected = greedy(engine, tok, conversation, thinking=True)
    reasoning, answer = split_reasoning(expected, in_think=True)
    assert second["state"] == "done" and reasoning  # the prompt opened <think>: all reasoning
    assert second["reasoning"] == reasoning and second["content"] == answer
    users = [e.text for e in browser.find_elements("css selector", ".message.user .content")]
    assert users == ["the quick brown fox", "jumps over the lazy dog"]

    browser.find_element("id", "reset").click()
    assert browser.find_elements("css selector", ".message") == []
    send_message(browser, "the quick brown fox")
    third = last_reply(browser)  # a new chat: no history, reasoning still on
    expected = greedy(engine, tok, [system, {"role": "user", "content": "the quick brown fox"}], True)
    assert third["reasoning"] == split_reasoning(expected, in_think=True)[0]


def test_server_errors_are_shown_in_the_page(served, browser):
    url, _, _ = served
    open_page(browser, url)
    set_field(browser, "max-tokens", "100000")  # far beyond the 512-token context
    send_message(browser, "hello")
    reply = last_reply(browser)
    assert reply["state"] == "error"
    assert "max_tokens" in reply["error"] and "context" in reply["error"] and "400" in reply["error"]


def test_api_key_is_required_and_remembered(served, browser):
    url, _, _ = served
    open_page(browser, url, api_key=None)
    wait_for(browser, lambda d: "API key" in d.find_element("id", "model").text, "the key request")
    set_field(browser, "api-key", "sesame")
    wait_for(browser, lambda d: d.find_element("id", "model").text.startswith("tiny-chat"),
             "the model name")
    browser.refresh()  # the key lives in localStorage
    wait_for(browser, lambda d: d.find_element("id", "model").text.startswith("tiny-chat"),
             "the model name after a reload")
    assert browser.find_element("id", "api-key").get_attribute("value") == "sesame"


def test_narrow_window_hides_settings_behind_a_button(served, browser):
    url, _, _ = served
    open_page(browser, url)  # the key is stored; the narrow page below reads it
    browser.set_window_size(420, 800)
    try:
        browser.refresh()
        wait_for(browser, lambda d: d.find_element("id", "model").text.startswith("tiny-chat"),
                 "the model name")
        right_edge = "return document.getElementById('settings').getBoundingClientRect().right"
        wait_for(browser, lambda d: d.execute_script(right_edge) <= 0, "the settings to be hidden")
        browser.find_element("id", "toggle-settings").click()
        wait_for(browser, lambda d: d.execute_script(right_edge) > 100, "the settings to open")
        composer = browser.find_element("id", "composer").rect
        assert composer["x"] >= 0 and composer["x"] + composer["width"] <= 420
    finally:
        browser.set_window_size(1200, 820)


# ---- docs screenshot ------------------------------------------------------------------------


def screenshot(checkpoint: str, out: str) -> None:
    """Serve `checkpoint`, hold a short conversation in the page and save a screenshot."""
    from smolforge.serve.app import RunningServer, create_app
    from smolforge.serve.cli import model_name_of
    from smolforge.train.checkpoint import load_model

    model, tok = load_model(checkpoint)
    with RunningServer(create_app(model, tok, model_name=model_name_of(checkpoint))) as server:
        driver = start_browser(1100, 760)
        try:
            open_page(driver, server.url, api_key=None)
            wait_for(driver, lambda d: "context" in d.find_element("id", "model").text, "the model")
            set_field(driver, "temperature", "0")
            for text in ("How many words are in this: wind rain moon love", "What is 630 plus 23?"):
                send_message(driver, text)
                last_reply(driver)
            driver.execute_script("document.querySelector('details.reasoning').open = true")
            driver.save_screenshot(out)
        finally:
            driver.quit()


if __name__ == "__main__":
    screenshot(sys.argv[1], sys.argv[2])
