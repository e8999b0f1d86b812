r"""Open the built docs in headless Chromium, offline, and check what a reader sees.

Run after the docs build (``make docs-check`` does both)::

    python docs/check_browser.py [--html docs/_build/html] [--width 1400]
                                 [--screenshots DIR] [PAGE ...]

Every page (default: all top-level pages, the gallery and the API pages) is
loaded from disk at the given window width with the network switched off
(DevTools' offline emulation, and every request that is not ``file:`` is
recorded), and fails on:

* **clipped content**: an element of the article whose content is wider than
  its box and that does not scroll (``overflow`` hidden or clip), or spills
  out of its box (``overflow: visible``) with no scrolling box around it
  inside the article; and a box that scrolls without drawing its own
  scrollbar (a ``::-webkit-scrollbar`` rule with a size): overlay
  scrollbars (touchpads, Macs) show only while one scrolls, so such a box
  looks cut at its edge;
* **the article itself wider than its column** (the page would scroll
  sideways, or the theme would cut it);
* **an empty sidebar**: a left or right column shown with no link in it;
* **two tables of contents**: an in-text ``contents`` box and the right
  column's page contents on the same page;
* **math not rendered**: a ``.math`` element without MathJax's output in it,
  or a MathJax error, or raw ``\(`` left in the text;
* **a request to the network**.

It talks to Chromium over the DevTools protocol on a pipe
(``--remote-debugging-pipe``): no port, no extra Python package. Chromium is
Debian's ``chromium`` (``apt-get install chromium``); ``--chromium PATH`` or
``$CHROMIUM`` names another binary. Exit status: 0 when every page passes,
1 when one fails, 2 when Chromium cannot be started.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Browser", "find_chromium", "main", "measure_page", "problems"]

HERE = Path(__file__).resolve().parent
# Pages whose screenshots the issue asked for, and the default page set's extras.
SCREENSHOT_PAGES = ("index", "training-loop", "rules-and-attacks")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-default-apps", "--disable-extensions", "--mute-audio",
    "--no-default-browser-check", "--disable-dev-shm-usage",
    # belt and braces with the offline emulation: no name resolves, no proxy answers
    "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
    # let the page's script read its own stylesheets (file: URLs are each an
    # origin of their own otherwise), to see which boxes draw their scrollbars
    "--allow-file-access-from-files",
    "--remote-debugging-pipe",
)

# Collects what a reader would see as broken; evaluated in the page. Every
# decision is made in Python (problems()), so that it can be tested without a
# browser.
MEASURE_JS = r"""
(async () => {
  const waitFor = async (ok, ms) => {
    const t0 = performance.now();
    while (!ok() && performance.now() - t0 < ms) await new Promise(r => setTimeout(r, 50));
  };
  // MathJax typesets after load: wait for it (and fail below if it never came)
  if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
    try { await window.MathJax.startup.promise; } catch (e) {}
  } else if (document.querySelector('.math')) {
    await waitFor(() => window.MathJax && window.MathJax.startup, 3000);
    if (window.MathJax && window.MathJax.startup) {
      try { await window.MathJax.startup.promise; } catch (e) {}
    }
  }
  if (document.fonts) await document.fonts.ready;
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));

  const shown = el => {
    const cs = getComputedStyle(el);
    const box = el.getBoundingClientRect();
    return cs.display !== 'none' && cs.visibility !== 'hidden' && box.width > 0 && box.height > 0;
  };
  const describe = el => {
    let s = el.tagName.toLowerCase();
    if (el.id) s += '#' + el.id;
    if (el.classList.length) s += '.' + [...el.classList].slice(0, 3).join('.');
    const text = (el.innerText || el.textContent || '').trim().split('\n')[0].slice(0, 60);
    return text ? `${s} "${text}"` : s;
  };
  // Selectors of the boxes that draw their own scrollbar (::-webkit-scrollbar
  // rules). Browsers with overlay scrollbars (touchpads, Macs) show a plain
  // one only while one scrolls, so a wide block looks cut at its edge.
  const drawnBars = [];
  let unreadable = 0;
  const collect = rules => {
    for (const rule of rules) {
      if (rule.cssRules && !rule.selectorText) { collect(rule.cssRules); continue; }
      if (!rule.selectorText || !rule.style) continue;
      for (const part of rule.selectorText.split(',')) {
        const m = part.trim().match(/^(.*)::-webkit-scrollbar$/);
        if (m && (rule.style.height || rule.style.width)) drawnBars.push(m[1].trim() || '*');
      }
    }
  };
  for (const sheet of document.styleSheets) {
    try { collect(sheet.cssRules); } catch (e) { unreadable += 1; }
  }
  const drawsBar = el => drawnBars.some(sel => { try { return el.matches(sel); }
                                                  catch (e) { return false; } });
  const article = document.querySelector('article.bd-article') || document.body;
  const column = document.querySelector('.bd-article-container') || article;
  const boxes = [];
  for (const el of [article, ...article.querySelectorAll('*')]) {
    if (el.closest('mjx-assistive-mml')) continue;      // MathJax's hidden copy for readers
    const cs = getComputedStyle(el);
    // inline boxes (words, inline code, inline math) overflow into their line: what
    // matters is whether the block around them does
    if (cs.display.startsWith('inline')) continue;
    const parent = el.parentElement;
    if (parent && getComputedStyle(parent).display.startsWith('inline')) continue;
    if (!shown(el)) continue;
    const over = el.scrollWidth - el.clientWidth;
    if (over <= 1) continue;
    // the nearest box around it that does not let content spill
    let holder = el.parentElement;
    while (holder && holder !== column.parentElement &&
           getComputedStyle(holder).overflowX === 'visible') holder = holder.parentElement;
    const holderCs = holder ? getComputedStyle(holder) : null;
    const bt = parseFloat(cs.borderTopWidth) || 0, bb = parseFloat(cs.borderBottomWidth) || 0;
    boxes.push({
      what: describe(el),
      overflow: cs.overflowX,
      over: over,
      scrollbar: el.offsetHeight - el.clientHeight - bt - bb,
      drawn: drawsBar(el),
      held_inside_article: !!holder && article.contains(holder) && holder !== article &&
                           ['auto', 'scroll'].includes(holderCs.overflowX),
    });
  }
  const links = sel => {
    const el = document.querySelector(sel);
    if (!el || !shown(el)) return null;
    return [...el.querySelectorAll('a[href]')].filter(shown).length;
  };
  const maths = [...document.querySelectorAll('article .math')];
  return {
    title: document.title,
    column: {what: describe(column), over: column.scrollWidth - column.clientWidth,
             width: column.clientWidth},
    boxes: boxes,
    primary_sidebar_links: links('#pst-primary-sidebar'),
    secondary_sidebar_links: links('#pst-secondary-sidebar'),
    contents_boxes: article.querySelectorAll('nav.contents, .topic.contents, div.contents').length,
    math: maths.length,
    math_rendered: maths.filter(m => m.querySelector('mjx-container svg')).length,
    math_errors: article.querySelectorAll('mjx-merror, [data-mjx-error]').length,
    raw_math: maths.some(m => !m.querySelector('mjx-container') &&
                              /\\\(|\\\[/.test(m.textContent)),
    mathjax: !!(window.MathJax && window.MathJax.version),
    unreadable_stylesheets: unreadable,
  };
})()
"""


def problems(measured: dict) -> list[str]:
    """What a reader would see as broken, from :data:`MEASURE_JS`'s measurements.

    Parameters
    ----------
    measured : dict
        One page's measurements.

    Returns
    -------
    problems : list of str
        Empty when the page passes.
    """
    found = []
    column = measured["column"]
    if column["over"] > 1:
        found.append(f"the article is {column['over']}px wider than its column "
                     f"({column['width']}px): content runs out of the page")
    for box in measured["boxes"]:
        if box["overflow"] in ("auto", "scroll"):
            if box["scrollbar"] < 4 or not box["drawn"]:
                found.append(f"scrolls with no visible scrollbar ({box['over']}px hidden; "
                             "overlay scrollbars show only while scrolling, so the box must "
                             f"draw its own): {box['what']}")
        elif box["overflow"] in ("hidden", "clip"):
            found.append(f"clipped by {box['over']}px (overflow: {box['overflow']}): "
                         f"{box['what']}")
        elif not box["held_inside_article"]:
            found.append(f"spills {box['over']}px out of its box, with no scrolling box "
                         f"around it: {box['what']}")
    for side, key in (("left", "primary_sidebar_links"), ("right", "secondary_sidebar_links")):
        if measured[key] == 0:
            found.append(f"the {side} sidebar is shown with nothing in it")
    if measured["contents_boxes"] and measured["secondary_sidebar_links"]:
        found.append("two tables of contents: an in-text contents box and the right sidebar")
    if measured["math"]:
        if not measured["mathjax"]:
            found.append(f"{measured['math']} formulas and no MathJax loaded: math shows as TeX")
        elif measured["math_rendered"] < measured["math"]:
            found.append(f"{measured['math'] - measured['math_rendered']} of "
                         f"{measured['math']} formulas not rendered")
        if measured["math_errors"]:
            found.append(f"{measured['math_errors']} formulas with MathJax errors")
        if measured["raw_math"]:
            found.append("raw TeX delimiters left in the text")
    if measured.get("unreadable_stylesheets"):
        found.append(f"{measured['unreadable_stylesheets']} stylesheets could not be read, "
                     "so scrollbars could not be checked")
    for url in measured.get("network", []):
        found.append(f"requested {url} (the docs must work offline)")
    return found


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium binary: ``explicit``, ``$CHROMIUM``, or ``chromium`` on PATH."""
    for name in (explicit, os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and (shutil.which(name) or Path(name).is_file()):
            return shutil.which(name) or name
    return None


class Browser:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (NUL-separated JSON).

    Parameters
    ----------
    binary : str
        Chromium executable.
    width, height : int
        Window size in CSS pixels.
    timeout : float
        Seconds to wait for one answer or one page load.
    """

    def __init__(self, binary: str, width: int = 1400, height: int = 1000,
                 timeout: float = 60.0):
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="flagagg-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire() -> None:
            # in the child: Chromium reads commands on fd 3 and writes on fd 4 (via
            # fresh copies first, in case the pipe ends are themselves 3 or 4)
            r, w = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            # fds 3 and 4 are made by dup2 in wire(), so inheritable; the pipes'
            # own ends are not (PEP 446) and stay behind
            preexec_fn=wire, close_fds=False,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]
        for method, params in (
            ("Page.enable", {}),
            ("Network.enable", {}),
            ("Network.emulateNetworkConditions",
             {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}),
            ("Emulation.setDeviceMetricsOverride",
             {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}),
        ):
            self.call(method, params, session=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"Chromium closed the DevTools pipe:\n{err}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, *, session: bool = False) -> dict:
        """Send one DevTools command and return its result (events are kept)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self._events.append(answer)

    def wait_event(self, method: str) -> dict:
        """Wait for an event of this page's session."""
        deadline = time.monotonic() + self.timeout
        while True:
            for i, event in enumerate(self._events):
                if event.get("method") == method and event.get("sessionId") == self.session:
                    return self._events.pop(i)
            self._events.append(self._read_message(deadline))

    def open(self, url: str) -> list[str]:
        """Load ``url``; return the URLs it requested that are not ``file:`` or ``data:``."""
        self._events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_event("Page.loadEventFired")
        return sorted({
            e["params"]["request"]["url"] for e in self._events
            if e.get("method") == "Network.requestWillBeSent"
            and not e["params"]["request"]["url"].startswith(("file:", "data:", "about:"))
        })

    def evaluate(self, expression: str) -> object:
        """Evaluate JavaScript in the page (awaiting a promise) and return its value."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: str | os.PathLike, *, scroll_to: str | None = None) -> None:
        """Write a PNG of the window, scrolled to the first element matching ``scroll_to``."""
        if scroll_to:
            self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(scroll_to)});"
                          " if (e) e.scrollIntoView({block: 'start'}); window.scrollBy(0, -90);"
                          " })()")
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        if scroll_to:
            self.evaluate("window.scrollTo(0, 0)")

    def close(self) -> None:
        """Close Chromium and remove its profile."""
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self.proc.stderr.close()
        self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class PageReport:
    """One page's outcome."""

    page: str
    problems: list[str] = field(default_factory=list)
    measured: dict = field(default_factory=dict)


def measure_page(browser: Browser, path: str | os.PathLike) -> dict:
    """Load one HTML file and return :data:`MEASURE_JS`'s measurements plus ``network``."""
    network = browser.open(Path(path).resolve().as_uri())
    measured = browser.evaluate(MEASURE_JS)
    measured["network"] = network
    return measured


def default_pages(html: Path) -> list[str]:
    """Top-level pages, the gallery and the API pages of a build (names without .html)."""
    skip = {"genindex", "search", "py-modindex"}
    pages = [p.stem for p in sorted(html.glob("*.html")) if p.stem not in skip]
    for folder in ("auto_examples", "api", "generated"):
        pages += [f"{folder}/{p.stem}" for p in sorted((html / folder).glob("*.html"))]
    return pages


def main(argv: list[str] | None = None) -> int:
    """Check the pages; print one line per page and the problems found."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="pages to check (default: all main pages)")
    parser.add_argument("--html", type=Path, default=HERE / "_build" / "html")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="write PNGs of the index, training-loop and rules-and-attacks "
                             "pages (top, and scrolled to the first code block) here")
    parser.add_argument("--chromium", default=None)
    args = parser.parse_args(argv)

    binary = find_chromium(args.chromium)
    if binary is None:
        print("check_browser: no Chromium found (apt-get install chromium, or --chromium PATH)",
              file=sys.stderr)
        return 2
    if not (args.html / "index.html").is_file():
        print(f"check_browser: no built docs in {args.html} (build them first)", file=sys.stderr)
        return 2
    pages = args.pages or default_pages(args.html)
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    reports = []
    t0 = time.perf_counter()
    try:
        browser = Browser(binary, args.width, args.height)
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"check_browser: Chromium ({binary}) did not start: {exc}", file=sys.stderr)
        return 2
    with browser:
        for page in pages:
            file = args.html / f"{page}.html"
            if not file.is_file():
                reports.append(PageReport(page, [f"no such page: {file}"]))
                continue
            measured = measure_page(browser, file)
            reports.append(PageReport(page, problems(measured), measured))
            if args.screenshots and page in SCREENSHOT_PAGES:
                stem = page.replace("/", "_")
                browser.screenshot(args.screenshots / f"{stem}-{args.width}.png")
                browser.screenshot(args.screenshots / f"{stem}-{args.width}-code.png",
                                   scroll_to="article div.highlight")
    bad = 0
    for rep in reports:
        m = rep.measured
        scrolling = sum(b["overflow"] in ("auto", "scroll") for b in m.get("boxes", []))
        info = (f"math {m.get('math_rendered', 0)}/{m.get('math', 0)}, "
                f"left links {m.get('primary_sidebar_links')}, "
                f"right links {m.get('secondary_sidebar_links')}, "
                f"{scrolling} wide boxes scroll") if m else ""
        print(f"{'FAIL' if rep.problems else 'ok  '} {rep.page:40s} {info}")
        for text in rep.problems:
            print(f"       - {text}")
        bad += bool(rep.problems)
    print(f"{len(reports) - bad} of {len(reports)} pages pass at {args.width}px, offline "
          f"({time.perf_counter() - t0:.1f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
