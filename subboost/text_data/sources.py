"""Parsers: one data member's bytes -> ``[(text, class name), ...]`` in file order.

Each parser reads one file format of the pinned wheels (`subboost.text_data.tasks.WHEELS`)
and nothing else: no cleaning, deduplication or balancing (`subboost.text_data.tasks` does
those, the same way for every task). A row that does not fit the format is an error naming
the member and the row, never skipped silently.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import re
import zipfile
from collections.abc import Callable

from subboost.errors import SubboostError

Rows = list[tuple[str, str]]

_URL = re.compile(r"https?(:\S*|…)|\bwww\.\S+")  # also the cut-off "http:…" and "http…" of retweets


def decode(data: bytes, member: str) -> str:
    """UTF-8 (a BOM dropped), else Latin-1 (every byte decodes): some members predate UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _csv_rows(text: str, member: str, required: tuple[str, ...]) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in required if c not in (reader.fieldnames or ())]
    if missing:
        raise SubboostError(f"{member}: no column {missing} (columns: {reader.fieldnames}).")
    return list(reader)


def trec_questions(data: bytes, member: str) -> Rows:
    """``COARSE:fine question ...`` lines (UIUC question classification); label: the coarse class."""
    rows = []
    for number, line in enumerate(decode(data, member).splitlines(), 1):
        if not line.strip():
            continue
        label, _, question = line.partition(" ")
        coarse = label.split(":", 1)[0]
        if ":" not in label or not coarse.isupper() or not question.strip():
            raise SubboostError(f"{member}: line {number} is not 'COARSE:fine question': {line[:60]!r}.")
        rows.append((question, coarse))
    return rows


def sms_spam(data: bytes, member: str) -> Rows:
    """CSV ``,spam,text`` with spam 0/1; labels ``ham`` / ``spam``."""
    rows = []
    for number, row in enumerate(_csv_rows(decode(data, member), member, ("spam", "text")), 2):
        if row["spam"] not in ("0", "1"):
            raise SubboostError(f"{member}: row {number} has spam={row['spam']!r}, not 0 or 1.")
        rows.append((row["text"], "spam" if row["spam"] == "1" else "ham"))
    return rows


def vader_ground_truth(threshold: float) -> Callable[[bytes, str], Rows]:
    """Tab-separated ``id sentiment text`` (mean rating -4..+4): ``positive`` at >= threshold,
    ``negative`` at <= -threshold; the sentences in between are left out (too close to neutral)."""
    def parse(data: bytes, member: str) -> Rows:
        lines = decode(data, member).splitlines()
        if not lines or lines[0].strip().split("\t") != ["id", "sentiment", "text"]:
            raise SubboostError(f"{member}: header is not 'id<TAB>sentiment<TAB>text'.")
        rows = []
        for number, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            try:
                score = float(parts[1])
            except (IndexError, ValueError):
                raise SubboostError(f"{member}: line {number} has no numeric sentiment: {line[:60]!r}.") from None
            if len(parts) < 3:
                raise SubboostError(f"{member}: line {number} has no text.")
            if score >= threshold:
                rows.append((parts[2], "positive"))
            elif score <= -threshold:
                rows.append((parts[2], "negative"))
        return rows
    return parse


def rotten_tomatoes(mapping: dict[str, str]) -> Callable[[bytes, str], Rows]:
    """bz2 CSV ``category,text,...`` (fresh / rotten reviews, plot summaries); ``mapping`` renames the
    categories kept (others are left out)."""
    def parse(data: bytes, member: str) -> Rows:
        try:
            text = decode(bz2.decompress(data), member)
        except (OSError, ValueError, EOFError) as err:
            raise SubboostError(f"{member}: not a readable bz2 file ({err}).") from err
        return [(row["text"], mapping[row["category"]])
                for row in _csv_rows(text, member, ("category", "text")) if row["category"] in mapping]
    return parse


def debate_speakers(speakers: tuple[str, ...]) -> Callable[[bytes, str], Rows]:
    """gzip CSV ``speaker,statement,...`` of the 2016 US debates; the given speakers' statements."""
    def parse(data: bytes, member: str) -> Rows:
        try:
            text = decode(gzip.decompress(data), member)
        except (OSError, ValueError, EOFError) as err:
            raise SubboostError(f"{member}: not a readable gzip file ({err}).") from err
        return [(row["statement"], row["speaker"].lower())
                for row in _csv_rows(text, member, ("speaker", "statement")) if row["speaker"] in speakers]
    return parse


def _inner_csv(data: bytes, member: str, inner: str, required: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            text = decode(archive.read(inner), member)
    except KeyError:
        raise SubboostError(f"{member}: the archive holds no {inner}.") from None
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise SubboostError(f"{member}: not a readable zip archive ({err}).") from err
    return _csv_rows(text, f"{member}:{inner}", required)


def health_tweets(sources: tuple[str, ...]) -> Callable[[bytes, str], Rows]:
    """Zipped ``healthtweets.csv`` (``source_id,text``, id ``<account>-<tweet id>``); label: the account.

    Links are removed: the accounts' URL shorteners would name the source without reading the tweet.
    """
    def parse(data: bytes, member: str) -> Rows:
        rows = []
        for row in _inner_csv(data, member, "healthtweets.csv", ("source_id", "text")):
            account = row["source_id"].rsplit("-", 1)[0]
            if account in sources:
                rows.append((_URL.sub(" ", row["text"]), account))
        return rows
    return parse


def news_titles(sources: tuple[str, ...]) -> Callable[[bytes, str], Rows]:
    """Zipped ``NewsArticles.csv``: each article's title, labelled by its link's site (``www.`` dropped)."""
    def parse(data: bytes, member: str) -> Rows:
        rows = []
        for row in _inner_csv(data, member, "NewsArticles.csv", ("article_source_link", "title")):
            site = re.sub(r"^https?://(www\.)?", "", row["article_source_link"]).split("/", 1)[0]
            if site in sources:
                rows.append((row["title"], site))
        return rows
    return parse
