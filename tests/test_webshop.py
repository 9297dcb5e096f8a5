"""WebShop: page reading and action parsing everywhere; the whole client path (search -> product -> option -> Buy
Now -> score) against a local fake of WebShop's server serving pages shaped like its templates; a dead or broken
server raises EnvironmentCrashed; the real server when one answers at $WEBSHOP_URL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest

from hpl_lightning.envs import EnvironmentCrashed, initial_messages, parse_action
from hpl_lightning.envs.webshop import (
    NO_ACTION,
    TEST_GOALS,
    WebShopEnv,
    goal_of,
    parse_page,
    parse_webshop_action,
    reachable,
)

GOAL = "i need a long lasting 6.76 fl oz bottle of l'eau d'issey, and price lower than 100.00 dollars"
HEAD = ('<head><link rel="stylesheet" href="/static/style.css"><title>WebShop</title>'
        "<style>.x {color: red}</style><script>var a = 1;</script></head>")
INSTRUCTION = f'<div id="instruction-text" class="text-center">\n  <h4>Instruction: <br>{GOAL}</h4>\n</div>'
START = f"""<!DOCTYPE html>
<html>
  {HEAD}
  <body>
    <!-- Code reference: https://bootsnipp.com/snippets/m13mN -->
    <div id="logo" class="text-center">
      <h2>WebShop</h2>
    </div>
    {INSTRUCTION}
    <form role="form" method="post" action="/fixed_2853">
      <input id="search_input" class="form-control" type="text" name="search_query" placeholder="Search..." required/>
      <button class="btn btn-success" type="submit"><i class="glyphicon glyphicon-search"></i>Search</button>
    </form>
  </body>
</html>"""
RESULTS = f"""<html>{HEAD}<body>
  {INSTRUCTION}
  <form method="post" action="/fixed_2853"><button type="submit" class="btn btn-primary">Back to Search</button></form>
  <div class="row"><h5>Page 1 (Total results: 50)</h5>
    <form method="post"><button class="btn btn-primary" type="submit">Next &gt;</button></form></div>
  <div class="product">
    <h4><a class="product-link" href="/item_page/fixed_2853/B000VOHH8I/x/1/%7B%7D">B000VOHH8I</a></h4>
    <h4>L'eau D'issey By Issey Miyake for MenEau De Toilette Spray, 6.7 Fl Oz Bottle</h4>
    <h5>$64.98</h5>
  </div>
  <div class="product">
    <h4><a class="product-link" href="/item_page/fixed_2853/B000MJZOPK/x/1/%7B%7D">B000MJZOPK</a></h4>
    <h4>L'eau d'Issey by Issey Miyake for Women 3.3 oz Eau de Toilette Spray</h4>
    <h5>$49.98</h5>
  </div>
</body></html>"""
ITEM = f"""<html>{HEAD}<body>
  {INSTRUCTION}
  <form method="post"><button type="submit" class="btn btn-primary">Back to Search</button></form>
  <form method="post"><button type="submit" class="btn btn-primary">&lt; Prev</button></form>
  <div class="radio-toolbar"><h4>size</h4>
    <input type="radio" id="radio_size0" name="size" value="2.5 fl oz"><label for="radio_size0">2.5 fl oz</label>
    <input type="radio" id="radio_size1" name="size" value="6.76 fl oz (pack of 1)"{{checked}}>
    <label for="radio_size1">6.76 fl oz (pack of 1)</label>
  </div>
  <h2>L'eau D'issey By Issey Miyake for MenEau De Toilette Spray, 6.7 Fl Oz Bottle</h2>
  <h4>Price: $64.98</h4><h4>Rating: N.A.</h4>
  <form method="post"><button class="btn btn-primary" type="submit">Description</button></form>
  <form method="post"><button class="btn btn-primary" type="submit">Features</button></form>
  <form method="post"><button class="btn btn-primary" type="submit">Reviews</button></form>
  <form method="post"><button class="btn btn-lg purchase" type="submit">Buy Now</button></form>
</body></html>"""
DONE = f"""<html>{HEAD}<body>
  <div id="thankyou"><h1>Thank you for shopping with us!</h1></div>
  <div id="stats"><h3 id="mturk_code">Your code: </h3><pre>xyz</pre>
    <h3>Purchased</h3><h4 id="asin">asin<pre>B000VOHH8I</pre></h4>
    <h4 id="reward">Your score (min 0.0, max 1.0)<pre>{{score}}</pre></h4>
  </div>
</body></html>"""
START_TEXT = f"WebShop [SEP] Instruction: [SEP] {GOAL} [SEP] Search"
RESULTS_TEXT = (f"Instruction: [SEP] {GOAL} [SEP] Back to Search [SEP] Page 1 (Total results: 50) [SEP] Next > [SEP] "
                "B000VOHH8I [SEP] L'eau D'issey By Issey Miyake for MenEau De Toilette Spray, 6.7 Fl Oz Bottle [SEP] "
                "$64.98 [SEP] B000MJZOPK [SEP] L'eau d'Issey by Issey Miyake for Women 3.3 oz Eau de Toilette Spray "
                "[SEP] $49.98")
ITEM_TEXT = (f"Instruction: [SEP] {GOAL} [SEP] Back to Search [SEP] < Prev [SEP] size [SEP] 2.5 fl oz [SEP] 6.76 fl oz "
             "(pack of 1) [SEP] L'eau D'issey By Issey Miyake for MenEau De Toilette Spray, 6.7 Fl Oz Bottle [SEP] "
             "Price: $64.98 [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now")


class FakeWebShop(BaseHTTPRequestHandler):
    """Serves the pages above by route, like WebShop's Flask app; records the paths asked for."""

    paths: list[str]
    score: str = "1.0"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = unquote(self.path)
        self.paths.append(path)
        route = path.strip("/").split("/")[0]
        if route.startswith("fixed_"):
            body = START
        elif route == "search_results":
            body = RESULTS
        elif route in ("item_page", "item_sub_page"):
            body = ITEM.replace("{checked}", " checked" if "6.76" in path else "")
        elif route == "done":
            body = DONE.replace("{score}", self.score)
        else:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[tuple[str, type[FakeWebShop]]]:
    handler = type("Handler", (FakeWebShop,), {"paths": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()
    thread.join()


# --- pure parts ---------------------------------------------------------------------------------------------------
def test_page_text_is_the_visible_text_nodes_joined_with_sep() -> None:
    assert parse_page(START).text == START_TEXT
    assert parse_page(RESULTS).text == RESULTS_TEXT
    page = parse_page(ITEM.replace("{checked}", ""))
    assert page.text == ITEM_TEXT
    assert set(page.clickables) == {"back to search", "< prev", "description", "features", "reviews", "buy now",
                                    "2.5 fl oz", "6.76 fl oz (pack of 1)"}
    assert page.clickables["6.76 fl oz (pack of 1)"].option_type == "size"
    assert {k for k, c in parse_page(RESULTS).clickables.items() if c.kind == "product"} == {"b000vohh8i",
                                                                                             "b000mjzopk"}


def test_score_from_the_page_after_buy_now() -> None:
    assert parse_page(DONE.replace("{score}", "0.6666666666666666")).score() == pytest.approx(2 / 3)
    assert parse_page(DONE.replace("{score}", "1.0")).score() == 1.0
    assert parse_page(RESULTS).score() is None
    assert parse_page(DONE.replace("{score}", "")).score() is None


def test_action_parsing_and_task_ids() -> None:
    text = "Thought: I should search first.\nAction: search[l'eau d'issey 6.76 fl oz bottle price < 100.00]"
    query = "l'eau d'issey 6.76 fl oz bottle price < 100.00"
    assert parse_webshop_action(parse_action(text) or "") == ("search", query)
    assert parse_webshop_action("click[< Prev]") == ("click", "< Prev")
    assert parse_webshop_action("buy it") == ("buy it", None)
    assert len(TEST_GOALS) == len(set(TEST_GOALS)) == 200
    assert goal_of("webshop/2853") == 2853
    with pytest.raises(ValueError, match="not a WebShop task id"):
        goal_of("webshop/fixed_1")


# --- the client against a fake server -----------------------------------------------------------------------------
def test_episode_search_product_option_buy(fake_server: tuple[str, type[FakeWebShop]]) -> None:
    url, handler = fake_server
    env = WebShopEnv(url, timeout=5)
    task = env.task("webshop/2853")
    assert task.description == START_TEXT and task.meta == {"goal": 2853}
    assert env.reset(task) == ""
    assert initial_messages(env, task)[2]["content"] == START_TEXT

    words = repr(["l'eau", "d'issey", "6.76", "fl", "oz"])  # the server reads the keywords as a list literal
    steps = [
        ("search[L'eau d'Issey 6.76 fl oz]", RESULTS_TEXT, f"/search_results/fixed_2853/{words}/1"),
        ("click[Buy Now]", RESULTS_TEXT, None),  # not on this page: nothing happens, nothing asked
        ("click[B000VOHH8I]", ITEM_TEXT, f"/item_page/fixed_2853/B000VOHH8I/{words}/1/{{}}"),
        ("click[6.76 fl oz (pack of 1)]", ITEM_TEXT,
         f"/item_page/fixed_2853/B000VOHH8I/{words}/1/{{'size': '6.76 fl oz (pack of 1)'}}"),
    ]
    for action, text, path in steps:
        before = len(handler.paths)
        result = env.step(action)
        assert (result.observation, result.reward, result.done) == (text, 0.0, False), action
        assert result.info["valid"] == (path is not None)
        assert handler.paths[before:] == ([path] if path else [])
    assert env.step("").observation == NO_ACTION
    result = env.step("click[Buy Now]")
    assert handler.paths[-1] == "/done/fixed_2853/B000VOHH8I/{'size': '6.76 fl oz (pack of 1)'}"
    assert (result.reward, result.done, result.info["success"], result.info["turns"]) == (1.0, True, True, 6)
    with pytest.raises(RuntimeError, match="no episode"):
        env.step("click[Back to Search]")


def test_partial_score_turn_limit_and_navigation(fake_server: tuple[str, type[FakeWebShop]]) -> None:
    url, handler = fake_server
    handler.score = "0.5"
    env = WebShopEnv(url, timeout=5, max_turns=10)
    task = env.task("webshop/2853")
    env.reset(task)
    env.step("search[perfume]")
    env.step("click[b000mjzopk]")  # product ids are matched case-insensitively
    assert handler.paths[-1].startswith("/item_page/fixed_2853/B000MJZOPK/")
    env.step("click[Description]")
    assert handler.paths[-1] == "/item_sub_page/fixed_2853/B000MJZOPK/['perfume']/1/Description/{}"
    env.step("click[Back to Search]")
    assert handler.paths[-1] == "/fixed_2853"
    env.step("search[perfume]")
    env.step("click[Next >]")
    assert handler.paths[-1] == "/search_results/fixed_2853/['perfume']/2"
    env.step("click[B000VOHH8I]")
    result = env.step("click[Buy Now]")
    assert (result.reward, result.done, result.info["success"]) == (0.5, True, False)

    env.reset(task)
    for _ in range(9):
        result = env.step("search[perfume]")
        assert not result.done
    result = env.step("search[perfume]")
    assert (result.reward, result.done, result.info["truncated"]) == (0.0, True, True)


def test_done_page_without_score_is_a_crash(fake_server: tuple[str, type[FakeWebShop]]) -> None:
    url, handler = fake_server
    handler.score = ""
    env = WebShopEnv(url, timeout=5)
    env.reset(env.task("webshop/2853"))
    env.step("search[perfume]")
    env.step("click[B000VOHH8I]")
    with pytest.raises(EnvironmentCrashed, match="no score"):
        env.step("click[Buy Now]")


def test_dead_server_raises(fake_server: tuple[str, type[FakeWebShop]]) -> None:
    url, _ = fake_server
    env = WebShopEnv(url, timeout=5)
    task = env.task("webshop/2853")
    env.reset(task)
    with pytest.raises(EnvironmentCrashed, match="answered 404"):
        env._get("nothing/here")
    dead = WebShopEnv("http://127.0.0.1:9", timeout=2)  # discard port: nothing listens
    with pytest.raises(EnvironmentCrashed, match="not reachable"):
        dead.reset(task)
    assert not reachable("http://127.0.0.1:9", timeout=2) and reachable(url)


def test_server_dying_mid_episode_raises(fake_server: tuple[str, type[FakeWebShop]]) -> None:
    url, _ = fake_server
    env = WebShopEnv(url, timeout=5)
    env.reset(env.task("webshop/2853"))
    env.url = "http://127.0.0.1:9"  # the same episode, its server gone
    with pytest.raises(EnvironmentCrashed, match="not reachable"):
        env.step("search[perfume]")


# --- the real server -----------------------------------------------------------------------------------------------
def test_real_server_episode() -> None:
    env = WebShopEnv(timeout=30)
    if not reachable(env.url, timeout=10):
        pytest.skip(f"WebShop server not reachable at {env.url} (start it as docs/environments.md describes, or set "
                    f"WEBSHOP_URL)")
    tasks = env.tasks("test")
    assert len(tasks) == 200 and all(t.description.startswith("WebShop [SEP] Instruction: [SEP] ") for t in tasks)
    env.reset(tasks[0])
    result = env.step("search[shoes]")
    assert "Back to Search" in result.observation and not result.done
    assert env._episode is not None
    product = next(k for k, c in env._episode.page.clickables.items() if c.kind == "product")
    env.step(f"click[{product}]")
    result = env.step("click[Buy Now]")
    assert result.done and 0.0 <= result.reward <= 1.0
