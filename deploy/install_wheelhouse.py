"""Install every wheel of a wheelhouse served over HTTP, a few hundred MB at a time (the
Dockerfile's offline build: ``WHEELS_URL``).

One ``pip install -r`` from such a wheelhouse keeps every wheel it downloaded until the whole
install ends, so torch with its CUDA libraries needs its wheels (3 GB) and what they unpack to
(5 GB) on disk at once. The wheelhouse is already a resolved set (tests/compose.py makes it with
pip's resolver), so each batch goes in with ``--no-deps``, and one batch of wheels at most is
on disk.

triton is left out: it is torch.compile's GPU kernel compiler, which this CPU image never loads
(torch imports without it, and the CPU index's torch does not require it); it is 0.9 GB installed.

    python install_wheelhouse.py http://172.17.0.1:38081/
"""

from __future__ import annotations

import html.parser
import subprocess
import sys
import urllib.parse
import urllib.request

BATCH_BYTES = 600_000_000
LEFT_OUT = ("triton",)


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def wheel_urls(index: str) -> list[str]:
    """The wheels a directory listing at ``index`` links to, less the ones left out."""
    with urllib.request.urlopen(index) as page:
        parser = _Links()
        parser.feed(page.read().decode())
    urls = [urllib.parse.urljoin(index, h) for h in parser.hrefs if h.endswith(".whl")]
    return [u for u in urls if project_name(u) not in LEFT_OUT]


def project_name(url: str) -> str:
    filename = urllib.parse.unquote(url.rsplit("/", 1)[-1])
    return filename.split("-", 1)[0].lower().replace("_", "-")


def size(url: str) -> int:
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as reply:
        return int(reply.headers.get("Content-Length", 0))


def batches(urls: list[str], limit: int = BATCH_BYTES) -> list[list[str]]:
    """Consecutive groups of at most ``limit`` bytes of wheels (a larger wheel goes alone)."""
    groups: list[list[str]] = []
    total = limit
    for url in urls:
        nbytes = size(url)
        if total + nbytes > limit:
            groups.append([])
            total = 0
        groups[-1].append(url)
        total += nbytes
    return groups


def main(index: str) -> None:
    urls = wheel_urls(index)
    if not urls:
        sys.exit(f"install_wheelhouse: no wheels listed at {index}")
    host = urllib.parse.urlsplit(index).hostname or ""
    groups = batches(urls)
    for i, group in enumerate(groups, 1):
        print(f"[wheelhouse] batch {i}/{len(groups)}: {len(group)} wheels", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
             "--trusted-host", host, *group],
            check=True,
        )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
