"""WebShop (github.com/princeton-nlp/WebShop) through its web server, behind the common interface, as ETO/IPR run it.

ETO/IPR drive WebShop's ``WebAgentTextEnv`` (``observation_mode="text"``, human goals) in-process; that needs the
product index and search engine in the same Python. Here the same pages come from WebShop's Flask server
(``web_agent_site/app.py``, port 3000), which renders the same templates, and this module plays the part of the text
environment's simulated browser:
- a task is a goal index; its server session is ``fixed_<index>``, which the server maps to the same goal (both
  shuffle the goals with seed 233); the test split is ETO/IPR's 200 goal indices (``test_indices.json``);
- actions: ``search[keywords]`` and ``click[value]``, where value is a button, a product (ASIN) or an option shown
  on the page; anything else leaves the page as it is (as in the text environment);
- observations: the page's visible text nodes joined with `` [SEP] `` (the text environment's "simple" mode);
- reward: the score on the page that ``click[Buy Now]`` opens (0-1), which ends the episode; 0 when the episode
  ends after 10 turns without a purchase; success = reward 1.

The server keeps only each session's goal; the page state (keywords, page, product, options) lives in the URLs,
so episodes are independent and the server can serve many in parallel. A server that cannot be reached, times out
or answers with an error raises ``EnvironmentCrashed``: the reward is then unknown, never a silent 0.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import quote

from hpl_lightning.envs.base import Environment, EnvironmentCrashed, StepResult, Task
from hpl_lightning.errors import UsageError

BENCHMARK = "webshop"
MAX_TURNS = 10
DEFAULT_URL = "http://127.0.0.1:3000"
SCORE_LABEL = "Your score (min 0.0, max 1.0)"
NO_ACTION = "Invalid action: no action given. Write one after 'Action:'."
BUY_NOW, BACK_TO_SEARCH, NEXT_PAGE, PREV_PAGE = "buy now", "back to search", "next >", "< prev"
SUB_PAGES = {"description": "Description", "features": "Features", "reviews": "Reviews", "attributes": "Attributes"}
_INVISIBLE = {"style", "script", "head", "title", "meta"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_ACTION = re.compile(r"(.+?)\[(.+)\]", re.DOTALL)

# ETO/IPR's WebShop test split: goal indices (eval_agent/data/webshop/test_indices.json).
TEST_GOALS = (
    2853, 5934, 1642, 4914, 4805, 9666, 900, 6133, 10887, 11543, 2583, 2933, 1689, 6351, 580, 10031, 1451, 11390,
    3403, 11870, 8693, 8359, 6719, 5413, 8255, 9639, 9188, 1346, 10959, 4705, 3917, 3503, 3584, 6446, 3141, 9645,
    3847, 10151, 1035, 5030, 9911, 5009, 11861, 4417, 8891, 2367, 11882, 3936, 11580, 1190, 10965, 1414, 8695, 485,
    10886, 9102, 2980, 3230, 6990, 3854, 9680, 4117, 3229, 8120, 10558, 8089, 10126, 11155, 4944, 8573, 7624, 8330,
    9744, 10660, 3466, 1427, 5948, 6453, 7331, 5433, 6943, 3642, 10183, 10364, 5825, 5492, 5613, 2640, 7097, 7375,
    7368, 3134, 4288, 8725, 10939, 8231, 6770, 3569, 10789, 5757, 7828, 8459, 10584, 9518, 5023, 11809, 4656, 5720,
    7475, 4161, 5455, 10072, 3841, 7802, 7265, 5144, 4196, 5457, 6604, 604, 3742, 861, 7232, 4249, 9346, 4999, 7235,
    7603, 7057, 6766, 6074, 4886, 8208, 7572, 11151, 9169, 1301, 4530, 1143, 314, 3012, 7209, 6275, 8387, 9794,
    10438, 950, 9963, 2828, 5563, 11358, 5900, 2751, 1857, 6925, 4962, 11572, 5375, 11322, 6206, 11831, 1145, 5068,
    6686, 11020, 7953, 1254, 8897, 9439, 4465, 10188, 11896, 3137, 978, 7922, 6115, 2159, 4318, 11755, 3354, 4078,
    7999, 7607, 9021, 988, 10982, 6596, 846, 1211, 7662, 3838, 8434, 2731, 4415, 1410, 1735, 4773, 7378, 3944, 818,
)

INSTRUCTION = """\
You are shopping on a web store for a customer. The first page shows the customer's request; find the product that \
matches it (kind, attributes, options such as size or colour, and price limit) and buy it.

At every turn, think briefly and then give exactly one action, in this form:
Thought: <your reasoning>
Action: <one action>

Actions:
- search[keywords]: search the store; choose the keywords carefully
- click[value]: click something shown on the current page: a product by its ID (e.g. click[B078GWRC1J]), an option \
(e.g. click[large]), or a button: Back to Search, Next >, < Prev, Description, Features, Reviews, Buy Now

Each observation is the text of the page, its parts separated by [SEP]. An action that is not possible on the \
current page does nothing. Select the options you need before you click Buy Now, which ends the task."""


@dataclass(frozen=True)
class Clickable:
    """Something the text environment lets the agent click: a button, a product link, or an option (radio input)."""

    kind: str  # "button" | "product" | "option"
    option_type: str = ""  # an option's group, e.g. "size"


@dataclass
class Page:
    """A page as the text environment sees it: visible text nodes and what can be clicked."""

    texts: list[str]
    clickables: dict[str, Clickable]

    @property
    def text(self) -> str:
        return " [SEP] ".join(self.texts)

    def score(self) -> float | None:
        """The reward on the page Buy Now opens: the text node after ``Your score (min 0.0, max 1.0)``."""
        if SCORE_LABEL not in self.texts:
            return None
        i = self.texts.index(SCORE_LABEL)
        try:
            return float(self.texts[i + 1])
        except (IndexError, ValueError):
            return None


class _PageParser(HTMLParser):
    """bs4-free rendition of the text environment's page reading: ``tag_visible`` text nodes; buttons (class
    ``btn``) and product links (class ``product-link``) keyed by their lower-cased text; radio inputs by value."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.texts: list[str] = []
        self.clickables: dict[str, Clickable] = {}
        self._open: list[tuple[str, str | None, list[str]]] = []  # (tag, clickable kind or None, its text parts)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "input" and a.get("type") == "radio":
            self.clickables[a.get("value", "")] = Clickable("option", a.get("name", "").lower())
        if tag in _VOID:
            return
        classes = a.get("class", "").split()
        self._open.append((tag, "button" if "btn" in classes else "product" if "product-link" in classes else None, []))

    def handle_endtag(self, tag: str) -> None:
        if all(t != tag for t, _, _ in self._open):
            return  # a stray end tag
        while self._open:
            open_tag, kind, parts = self._open.pop()
            if kind:
                self.clickables["".join(parts).strip().lower()] = Clickable(kind)
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, kind, parts in self._open:
            if kind:
                parts.append(data)
        if self._open and self._open[-1][0] not in _INVISIBLE and data.strip():
            self.texts.append(data.strip())


def parse_page(html: str) -> Page:
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    return Page(parser.texts, parser.clickables)


def parse_webshop_action(action: str) -> tuple[str, str | None]:
    """``search[red shoes]`` -> ("search", "red shoes"); anything else -> (text, None), as WebShop's parser."""
    match = _ACTION.fullmatch(action.strip())
    return (match[1].strip(), match[2].strip()) if match else (action.strip(), None)


def goal_of(tid: str) -> int:
    parts = tid.split("/")
    if len(parts) != 2 or parts[0] != BENCHMARK or not parts[1].isdigit():
        raise ValueError(f"not a WebShop task id: {tid!r} (expected '{BENCHMARK}/<goal index>')")
    return int(parts[1])


@dataclass
class _Episode:
    """The simulated browser's state: which page, reached how (the server keeps none of it)."""

    session: str
    page: Page
    kind: str = "start"  # start | search | item | item_sub | done
    keywords: list[str] = field(default_factory=list)
    page_num: int = 1
    asin: str = ""
    options: dict[str, str] = field(default_factory=dict)
    turns: int = 0
    done: bool = False


class WebShopEnv(Environment):
    """WebShop episodes against a running WebShop server.

    ``url``: the server (default ``$WEBSHOP_URL``, else ``http://127.0.0.1:3000``); ``timeout``: seconds per page
    (the server's first request loads the product catalogue and can take minutes: start it and open one page before
    evaluating). Task descriptions are the start pages' text, so listing a split asks the server for each.
    """

    benchmark = BENCHMARK
    instruction = INSTRUCTION

    def __init__(self, url: str | None = None, timeout: float = 60.0, max_turns: int = MAX_TURNS):
        self.url = (url or os.environ.get("WEBSHOP_URL") or DEFAULT_URL).rstrip("/")
        self.timeout, self.max_turns = timeout, max_turns
        self._episode: _Episode | None = None

    # --- tasks -------------------------------------------------------------------------------------------------
    def tasks(self, split: str) -> list[Task]:
        if split != "test":
            raise UsageError(f"WebShop has the 'test' split here (ETO's 200 goals); use task('webshop/<goal>') for "
                             f"others, not {split!r}")
        return [self.task(f"{BENCHMARK}/{goal}") for goal in TEST_GOALS]

    def task(self, tid: str) -> Task:
        """The task of goal ``webshop/<index>``: its description is the start page (with the customer's request)."""
        goal = goal_of(tid)
        return Task(tid, self._get(self._session(goal)).text, {"goal": goal})

    @staticmethod
    def _session(goal: int) -> str:
        return f"fixed_{goal}"

    # --- episodes ----------------------------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        """Opens the start page; returns '' because the task description already is that page."""
        session = self._session(goal_of(task.id))
        self._episode = _Episode(session, self._get(session))
        return ""

    def step(self, action: str) -> StepResult:
        ep = self._episode
        if ep is None or ep.done:
            raise RuntimeError("no episode in progress: call reset(task) first (or again after done)")
        valid, reward = True, 0.0
        if not action.strip():
            observation, valid = NO_ACTION, False
        else:
            valid = self._act(ep, action)
            observation = ep.page.text
            if ep.kind == "done":
                score = ep.page.score()
                if score is None:
                    raise EnvironmentCrashed(f"WebShop at {self.url}: the page after Buy Now shows no score")
                reward = score
        ep.turns += 1
        truncated = ep.turns >= self.max_turns and ep.kind != "done"
        ep.done = ep.kind == "done" or truncated
        info = {"valid": valid, "success": reward == 1.0, "turns": ep.turns, "truncated": truncated,
                "page": ep.kind, "asin": ep.asin, "options": dict(ep.options)}
        return StepResult(observation, reward, ep.done, info)

    def _act(self, ep: _Episode, action: str) -> bool:
        """Follows the text environment (``WebAgentTextEnv.step`` / ``SimServer.receive``); False: nothing done."""
        name, arg = parse_webshop_action(action)
        arg = arg.lower() if arg is not None else None
        if name == "search" and arg:
            self._search(ep, arg.split(" "), 1)
            return True
        if name != "click" or arg is None or arg == "search" or arg not in ep.page.clickables:
            return False
        clickable = ep.page.clickables[arg]
        if arg == BUY_NOW:
            if not ep.asin:
                return False
            self._open(ep, "done", f"done/{ep.session}/{ep.asin}/{self._q(repr(ep.options))}")
        elif arg == BACK_TO_SEARCH:
            ep.keywords, ep.page_num, ep.asin, ep.options = [], 1, "", {}
            self._open(ep, "start", ep.session)
        elif arg == NEXT_PAGE and ep.kind == "search":
            self._search(ep, ep.keywords, ep.page_num + 1)
        elif arg == PREV_PAGE and ep.kind == "search":
            self._search(ep, ep.keywords, ep.page_num - 1)
        elif arg == PREV_PAGE and ep.kind == "item_sub":
            self._item(ep)
        elif arg == PREV_PAGE and ep.kind == "item":
            self._search(ep, ep.keywords, ep.page_num)
        elif arg in SUB_PAGES:
            self._open(ep, "item_sub", f"item_sub_page/{ep.session}/{ep.asin}/{self._keywords(ep)}/{ep.page_num}/"
                                       f"{SUB_PAGES[arg]}/{self._q(repr(ep.options))}")
        elif clickable.kind == "product":
            ep.asin = arg.upper()
            self._item(ep)
        elif clickable.kind == "option" and ep.asin:
            ep.options[clickable.option_type] = arg
            self._item(ep)
        else:
            return False
        return True

    def _search(self, ep: _Episode, keywords: list[str], page_num: int) -> None:
        ep.keywords, ep.page_num, ep.asin, ep.options = keywords, page_num, "", {}
        self._open(ep, "search", f"search_results/{ep.session}/{self._keywords(ep)}/{page_num}")

    def _item(self, ep: _Episode) -> None:
        self._open(ep, "item", f"item_page/{ep.session}/{ep.asin}/{self._keywords(ep)}/{ep.page_num}/"
                               f"{self._q(repr(ep.options))}")

    def _keywords(self, ep: _Episode) -> str:
        return self._q(repr(ep.keywords))  # the server reads a list literal (convert_web_app_string_to_var)

    @staticmethod
    def _q(text: str) -> str:
        return quote(text, safe="")

    def _open(self, ep: _Episode, kind: str, path: str) -> None:
        ep.page, ep.kind = self._get(path), kind

    def _get(self, path: str) -> Page:
        url = f"{self.url}/{path}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                html = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            raise EnvironmentCrashed(f"WebShop server at {self.url} answered {e.code} for {url}") from e
        except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
            raise EnvironmentCrashed(f"WebShop server not reachable at {self.url} ({url}): {e}") from e
        return parse_page(html)

    def close(self) -> None:
        self._episode = None


def reachable(url: str | None = None, timeout: float = 5.0) -> bool:
    """Whether a WebShop server answers at ``url`` (default ``$WEBSHOP_URL``): for tests and scripts to check first."""
    try:
        WebShopEnv(url, timeout)._get(f"{WebShopEnv._session(TEST_GOALS[0])}")
    except EnvironmentCrashed:
        return False
    return True

