"""The command line: stream a CSV through a session, write its predictions (needs the ``client`` extra for the
progress bar and plot); export, import and fork a session's state:

    python -m service.client stream --csv series.csv --session pump-7 [--chunk 32] [--url URL]
        [--out predictions.csv] [--plot out.png] [--columns a,b] [--api-key KEY] [--reset | --resume]
        [--transport http|ws] [--window 64]
    python -m service.client export --session pump-7 --out pump-7.state
    python -m service.client import --session pump-7 --file pump-7.state [--if-match ETAG]
    python -m service.client fork --session pump-7 --to pump-7-what-if

Reading the CSV in place (a header told by its cells' shape, blank, non-finite or past-float32 rows refused
by line), a predictions file written as the answers come, which a stream stopped in any way (Ctrl-C, SIGTERM,
SIGHUP, SIGKILL) leaves whole and ``--resume`` extends (over the WebSocket a SIGKILL can leave up to
``--window`` chunks without their answers: docs/interop.md).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import math
import os
import re
import signal
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, overload

import httpx

from service.client import (
    INSTALL,
    SESSION_ID_RULE,
    Client,
    ModelChanged,
    OffsetConflict,
    Prediction,
    ServiceError,
    Session,
    SessionNotFound,
)

if TYPE_CHECKING:  # websockets, which the stream needs, is loaded only by those who stream
    from service.client.stream import StreamSession


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _blank(row: list[str]) -> bool:
    return not any(cell.strip() for cell in row)


def _shape(cell: str) -> str:
    """A cell with its runs of letters and of digits each reduced to one mark: 2020-01-01 and 2021-12-31
    look alike, "date" does not."""
    return re.sub(r"[0-9]+", "9", re.sub(r"[^\W\d_]+", "a", cell.strip()))


class Rows(Sequence[list[float]]):
    """A CSV's rows of floats in one flat array of doubles: 8 bytes a value where a list of floats takes
    about 32, and the cells' strings several times that, so a long series fits in memory. Slices are views;
    ``tolist()`` is what the client sends."""

    def __init__(self, values: array[float], width: int, start: int = 0, stop: int | None = None):
        self._values, self._width = values, width
        self._start = start
        self._stop = len(values) // width if stop is None else stop

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> list[float]: ...

    @overload
    def __getitem__(self, index: slice) -> Rows: ...

    def __getitem__(self, index: int | slice) -> list[float] | Rows:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("rows are sliced with step 1 only")
            return Rows(self._values, self._width, self._start + start, self._start + max(start, stop))
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        at = (self._start + index % len(self)) * self._width
        return self._values[at : at + self._width].tolist()

    def tolist(self) -> list[list[float]]:
        return [self[i] for i in range(len(self))]


def _filled(path: Path, reader: Any) -> Iterator[tuple[int, list[str]]]:
    """(line, cells) of each row; blank lines at the end are no rows, one before a row is refused: skipping
    it would shift every later step against the file's time axis."""
    blank: int | None = None
    for row in reader:
        if _blank(row):
            blank = blank or reader.line_num
            continue
        if blank is not None:
            raise SystemExit(f"{path}:{blank}: empty row; fill or remove it (the service takes evenly spaced"
                             " steps)")
        yield reader.line_num, row


def read_csv(path: Path, features: Sequence[str], columns: Sequence[str] | None) -> tuple[list[str], Rows]:
    """(column names, rows) of the model's inputs from a CSV, with or without a header row, read one row at a
    time: only the picked columns' numbers are kept.

    Columns: ``columns`` if given; else the model's feature names when the header has them all; else the
    numeric columns, if there are as many as the model takes features."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:  # a spreadsheet's byte-order mark is no text
            return _read_rows(path, csv.reader(file), features, columns)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SystemExit(f"{path}: cannot read it as a UTF-8 CSV: {exc}") from None


def _read_rows(path: Path, reader: Any, features: Sequence[str],
               columns: Sequence[str] | None) -> tuple[list[str], Rows]:
    filled = _filled(path, reader)
    head = list(itertools.islice(filled, 2))
    if not head:
        raise SystemExit(f"{path} is empty")
    first = head[0][1]
    second = head[1][1] if len(head) > 1 else []
    # A header: a cell that is not a number over one that is, or over text of another shape (a column named
    # "date" over 2020-01-01; a headerless date column has one shape in every row). One row: any text.
    has_header = (any(_number(a) is None and (_number(b) is not None or _shape(a) != _shape(b))
                      for a, b in zip(first, second, strict=False))
                  if second else any(_number(cell) is None for cell in first))
    header = [cell.strip() for cell in first] if has_header else [f"column{i}" for i in range(len(first))]
    data = head[1:] if has_header else head
    if not data:
        raise SystemExit(f"{path} has a header and no rows")
    if columns:
        missing = [c for c in columns if c not in header]
        if missing:
            raise SystemExit(f"{path} has no column {', '.join(missing)}; it has {', '.join(header)}")
        picked = [header.index(c) for c in columns]
    elif all(f in header for f in features):
        picked = [header.index(f) for f in features]
    else:
        row = data[0][1]
        picked = [i for i in range(len(header)) if i < len(row) and _number(row[i]) is not None]
    if len(picked) != len(features):
        raise SystemExit(f"the model takes {len(features)} feature(s) ({', '.join(features)}); {path} has"
                         f" {len(picked)} numeric column(s) ({', '.join(header[i] for i in picked)}): choose"
                         " with --columns")
    values = array("d")
    for line, row in itertools.chain(data, filled):
        try:
            numbers = [float(row[i]) for i in picked]
        except (ValueError, IndexError):
            numbers = []
        # As float32, which the service reads them as: past its range they are inf, which the service refuses
        # with a 422 that names no line, once the rows before were sent.
        if len(numbers) != len(picked) or not all(map(math.isfinite, array("f", numbers))):
            where = ", ".join(header[i] for i in picked)
            past = len(numbers) == len(picked) and all(map(math.isfinite, numbers))
            why = "a number past float32's range (|x| > 3.4e38)" if past else "not a finite number"
            raise SystemExit(f"{path}:{line}: {why} in column(s) {where}")
        values.extend(numbers)
    return [header[i] for i in picked], Rows(values, len(picked))


def _progress() -> Any:
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    except ImportError:  # the client extra is not installed: no bar
        return None
    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), transient=False)


def _header(names: Sequence[str]) -> list[str]:
    return ["step", *names, *(f"predicted_{n}" for n in names)]


def _complete_lines(file: TextIO) -> Iterator[str]:
    """The file's lines that end where a line ends: a row cut short (a crash mid-write) is no row."""
    for line in file:
        if line.endswith("\n"):
            yield line


def _earlier_rows(path: Path, names: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """(step, cells) of each row of an earlier run's predictions file for columns ``names``, read a row at a
    time; nothing for a file with another header. ValueError for a row that is not a step's."""
    with path.open(newline="") as file:
        rows = csv.reader(_complete_lines(file))
        if next(rows, None) != _header(names):
            return
        for row in rows:
            if len(row) != 1 + 2 * len(names) or not row[0].isdigit():
                raise ValueError(f"not a row of steps: {row[:4]}")
            yield int(row[0]), row


def _earlier_end(path: Path, names: Sequence[str], truth: Sequence[Sequence[float]]) -> int | None:
    """The last step of an earlier run's predictions file for this series; None if there is no such file, or
    it was written for other columns or a series whose values differ from ``truth``."""
    if not path.exists():
        return None
    end = None
    try:
        for step, row in _earlier_rows(path, names):
            actual = row[1 : 1 + len(names)]
            if any(actual) and (step >= len(truth) or [float(cell) for cell in actual] != list(truth[step])):
                return None  # blank in the last row of a run: the step after its series
            end = step
    except ValueError:
        return None
    return end


class PredictionsFile:
    """The predictions CSV, kept in step with the session while a stream runs.

    One row per step: the truth, and the prediction *for* that step (made after the step before); the last
    row holds the prediction for the step after the series. At the first answer the file is written whole
    (beside the old one, then renamed over it: an interruption never leaves half of either), keeping the run
    before's rows up to ``start`` and its prediction for step ``start``, so that a stream cut off and resumed
    leaves one file. Every answer's rows are then appended in one write: a stream killed at any moment
    (SIGKILL, the OOM killer) leaves a file that ends where its session is or one chunk before, and --resume
    takes either.
    """

    def __init__(self, path: Path, names: Sequence[str], truth: Sequence[Sequence[float]], start: int,
                 extends: bool = False):
        """``extends``: the file at ``path`` is an earlier run's for this series (``_earlier_end``), which a
        resumed stream extends."""
        self.path, self.names, self.truth, self.start = path, names, truth, start
        self.extends = extends
        self.end = start  # the step of the last row written
        self._file: TextIO | None = None

    def _row(self, step: int, prediction: Sequence[Any]) -> list[Any]:
        actual = list(self.truth[step]) if step < len(self.truth) else [""] * len(self.names)
        return [step, *actual, *prediction]

    def open(self) -> None:
        """Write the head of the file: the header, the run before's rows, the row for ``start``."""
        if self._file is not None:
            return
        written = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        file = written.open("w", newline="")
        try:
            writer = csv.writer(file)
            writer.writerow(_header(self.names))
            writer.writerow(self._row(self.start, self._kept(file, writer)))
            file.flush()
            os.replace(written, self.path)
        except BaseException:
            file.close()
            written.unlink(missing_ok=True)
            raise
        self._file = file

    def _kept(self, file: TextIO, writer: Any) -> Sequence[Any]:
        """The earlier run's rows before ``start``, copied a row at a time after the header; its prediction for
        step ``start``, which the row written next carries. Where the earlier file has no row at ``start``
        none is kept (the prediction for it is blank)."""
        carried: Sequence[Any] = [""] * len(self.names)
        if not self.extends or self.start == 0:
            return carried
        previous: list[str] | None = None
        for step, row in _earlier_rows(self.path, self.names):
            if step > self.start:
                continue
            if previous is not None:
                writer.writerow(previous)
            previous = row
        if previous is not None and int(previous[0]) == self.start:
            return previous[1 + len(self.names) :]
        file.seek(0)  # no row at ``start``: the copied rows go
        file.truncate()
        writer.writerow(_header(self.names))
        return carried

    def append(self, predictions: Sequence[Sequence[float]]) -> None:
        """The rows of the steps after the last one written, each with its prediction."""
        self.open()
        assert self._file is not None
        rows = io.StringIO()
        csv.writer(rows).writerows(self._row(self.end + 1 + i, p) for i, p in enumerate(predictions))
        self._file.write(rows.getvalue())
        self._file.flush()
        self.end += len(predictions)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _recover_lost_answer(session: Session, path: Path, end: int | None,
                         rows: Sequence[Sequence[float]]) -> tuple[int, list[list[float]]]:
    """Where a resumed stream's file starts again, and the answers it lacks up to the session's position.

    A stream interrupted (Ctrl-C, a dropped network, SIGKILL) while a chunk was in flight leaves a file that
    ends where that chunk began, or inside it when the append was cut short: the service applied the chunk,
    the file never got its answer. Sent again as it was (same offset, same values) it is an exact retry,
    which the service answers again; where it began is the session's ``last_offset`` (its state), as the
    series' last chunk may be shorter than ``--chunk``. Anything else (more than the last chunk missing)
    cannot be asked for again: refused rather than leave a gap in the file or overwrite it. ``end``: the
    last step of the file (``_earlier_end``).
    """
    if end is None or end >= session.position:
        return session.position, []
    position = session.position
    begin = session.export_state().last_offset
    if 0 <= begin <= end:
        session.position = begin
        try:
            return begin, session.predict(rows[begin:position]).predictions
        except OffsetConflict:
            session.position = position
    raise SystemExit(f"{path} ends at step {end} but session {session.id} is at {position}, and only the last"
                     " chunk's answer can be asked for again: --out another file keeps this one, --reset"
                     " starts the session again")


def _at_zero(session: Session) -> bool:
    """Whether the service has the session at position 0 or not at all: where a plain run starts."""
    try:
        return session.info().get("position") == 0
    except SessionNotFound:
        return True


def plot(path: Path, names: Sequence[str], truth: Sequence[Sequence[float]],
         predictions: Sequence[Sequence[float]], start: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(names)
    fig, axes = plt.subplots(count, 1, figsize=(11, 3 * count), squeeze=False, sharex=True)
    steps = range(start, start + len(truth))
    for j, (name, ax) in enumerate(zip(names, axes[:, 0], strict=True)):
        ax.plot(steps, [row[j] for row in truth], label="truth", linewidth=1.2)
        ax.plot(range(start + 1, start + len(predictions) + 1), [row[j] for row in predictions],
                label="one-step prediction", linewidth=1.0, alpha=0.85)
        ax.set_ylabel(name)
        ax.legend(loc="upper left")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("truth vs one-step-ahead prediction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _over_http(client: Client, session: Session, rows: Sequence[Sequence[float]],
               args: argparse.Namespace) -> Iterator[Prediction]:
    """One call per chunk, each answered before the next is sent."""
    for offset in range(0, len(rows), args.chunk):
        yield session.predict(rows[offset : offset + args.chunk])


def _over_ws(client: Client, session: Session, rows: Sequence[Sequence[float]],
             args: argparse.Namespace) -> Iterator[Prediction]:
    """Chunks pipelined over the session's WebSocket, from where ``session`` is (the service's position only
    with ``--resume``: a plain run starts at 0, as over HTTP), which the rows start at: the position is not
    read again, as a second read could find the session moved and send the rows at another offset. An answer
    lost with a dropped connection (not the last one) cannot be had again: the file stops before it, as one
    stopped by a refusal does."""
    if not len(rows):  # a resumed run that has nothing left to send
        return
    with client.stream_session(session.id, window=args.window, position=session.position) as stream, \
            _finishing(stream):
        try:
            for answer in stream.stream(rows, args.chunk):
                if stream.lost:
                    break
                yield answer
        finally:
            session.position = stream.position
        if stream.lost:
            offset, steps = stream.lost[0]
            raise SystemExit(f"the answer to steps {offset} to {offset + steps - 1} was lost with a dropped"
                             f" connection, and the session is past them (at {stream.position}): --out another"
                             " file and --resume to go on")


@contextlib.contextmanager
def _finishing(stream: StreamSession) -> Iterator[None]:
    """While chunks are pipelined, the first SIGINT, SIGTERM or SIGHUP stops the sending only: the answers of
    the chunks already sent (which the service applies whatever the client does) still come and are
    written, so the file ends where the session is and --resume goes on from it. A second one stops at once
    (the file then ends up to ``--window`` chunks behind its session). An ignored signal stays ignored."""
    stopped: list[int] = []

    def stop(signum: int, frame: object) -> None:
        if stopped:
            raise _Stopped(signum)
        stopped.append(signum)
        stream.stop()

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    if stopped:
        raise _Stopped(stopped[0])


def _features(model: dict[str, Any]) -> list[str]:
    """The model's feature names, as GET /v1/model gives them: the columns a CSV must have."""
    names = model.get("feature_names")
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise SystemExit(f"GET /v1/model answered feature_names {names!r}, not a list of names: is --url the"
                         " service?")
    return names


def stream_csv(args: argparse.Namespace) -> int:
    with Client(args.url, args.api_key, timeout=args.timeout) as client:
        names, rows = read_csv(args.csv, _features(client.model()), args.columns)
        session = client.session(args.session, resume=args.resume)
        if args.reset:
            session.reset()
        if session.position > len(rows):
            raise SystemExit(f"session {args.session} is at position {session.position}, past the {len(rows)}"
                             f" rows of {args.csv}")
        out = args.out or args.csv.with_name(args.csv.stem + ".predictions.csv")
        end = _earlier_end(out, names, rows) if args.resume else None
        start, predictions = (_recover_lost_answer(session, out, end, rows) if args.resume
                              else (0, []))
        todo = rows[start:]
        out_file = PredictionsFile(out, names, rows, start, end is not None)
        progress = _progress() if not args.quiet else None
        task = progress.add_task(f"session {args.session}", total=len(todo)) if progress else None
        try:
            if args.reset or args.resume or _at_zero(session):
                out_file.open()  # before anything is sent: killed from here on, the file is at most a chunk behind
            if predictions:
                out_file.append(predictions)
            if progress:
                progress.start()
                progress.update(task, advance=len(predictions))
            send = _over_ws if args.transport == "ws" else _over_http
            try:
                for answer in send(client, session, todo[len(predictions):], args):
                    out_file.append(answer.predictions)
                    if args.plot:  # only the plot needs them all: the file has them
                        predictions.extend(answer.predictions)
                    if progress:
                        progress.update(task, advance=len(answer.predictions))
            except ModelChanged as exc:
                raise SystemExit(f"{exc}\nthe session's state is from another model version: --reset to"
                                 " start it again with this one") from None
            except OffsetConflict as exc:
                raise SystemExit(f"{exc}\nthe session is at {exc.position}: --resume to continue from"
                                 " there, --reset to start again") from None
        except (ServiceError, httpx.HTTPError, SystemExit, KeyboardInterrupt):
            if out_file.end > start:  # the file has what was answered: a --resume run extends it
                print(f"steps {start} to {out_file.end - 1} and their predictions are in {out};"
                      " --resume goes on from there", file=sys.stderr)
            raise
        finally:
            out_file.close()
            if progress:
                progress.stop()
    message = f"{len(todo)} steps from position {start} -> {session.position}; predictions in {out}"
    if args.plot:
        plot(args.plot, names, todo, predictions, start)
        message += f", plot in {args.plot}"
    if client.stats.retries:
        message += f" ({client.stats.retries} retried call(s))"
    print(message, file=sys.stderr)
    return 0


def export_state(args: argparse.Namespace) -> int:
    with Client(args.url, args.api_key, timeout=args.timeout) as client:
        state = client.session(args.session).export_state()
    out = args.out or Path(f"{args.session}.state")
    state.save(out)
    print(f"session {args.session}: {len(state.document)} bytes in {out}, ETag {state.etag}", file=sys.stderr)
    return 0


def import_state(args: argparse.Namespace) -> int:
    with Client(args.url, args.api_key, timeout=args.timeout) as client:
        described = client.session(args.session).import_state(args.file.read_bytes(), args.if_match)
    print(f"session {args.session} at position {described['position']} from {args.file}", file=sys.stderr)
    return 0


def fork(args: argparse.Namespace) -> int:
    with Client(args.url, args.api_key, timeout=args.timeout) as client:
        forked = client.session(args.session).fork(args.to)
    print(f"session {args.to} forked from {args.session} at position {forked.position}", file=sys.stderr)
    return 0


def _url(text: str) -> str:
    """``--url`` as given, once httpx can parse it: one it cannot (a bad port) would end in its traceback."""
    try:
        httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc}") from None
    return text


def _connection() -> argparse.ArgumentParser:
    """The options every command takes: where the service is, the key, how long a call may take."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--url", type=_url, default=os.environ.get("GRU_URL", "http://127.0.0.1:8000"),
                         help="service base URL (default $GRU_URL or http://127.0.0.1:8000)")
    options.add_argument("--api-key", default=os.environ.get("GRU_API_KEY"), help="default $GRU_API_KEY")
    options.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    options.add_argument("--session", required=True, help=f"session id ({SESSION_ID_RULE})")
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = [_connection()]
    stream = commands.add_parser("stream", parents=common,
                                 help="stream a CSV through a session, write its predictions")
    stream.add_argument("--csv", type=Path, required=True, help="input series, one row a step")
    stream.add_argument("--chunk", type=int, default=32, help="steps per call (default 32)")
    stream.add_argument("--out", type=Path, help="predictions CSV, never the --csv file (default FILE.predictions.csv);"
                        " --resume extends it when it ends where the session is")
    stream.add_argument("--plot", type=Path, help="also draw truth vs prediction to this PNG")
    stream.add_argument("--columns", type=lambda s: [c.strip() for c in s.split(",")],
                        help="comma-separated CSV columns to send (default: the model's feature names)")
    stream.add_argument("--transport", choices=("http", "ws"), default="http",
                        help="http: one call per chunk (default); ws: pipelined over the session's WebSocket")
    stream.add_argument("--window", type=int, default=64, help="--transport ws: chunks in flight (default 64)")
    stream.add_argument("--quiet", action="store_true", help="no progress bar")
    exporting = commands.add_parser("export", parents=common, help="save a session's state document to a file")
    exporting.add_argument("--out", type=Path, help="the file (default SESSION.state)")
    importing = commands.add_parser("import", parents=common,
                                    help="create or replace a session from a state document")
    importing.add_argument("--file", type=Path, required=True, help="a document `export` saved")
    importing.add_argument("--if-match", help="only over the session at this ETag (export prints it)")
    forking = commands.add_parser("fork", parents=common, help="copy a session to a new session id")
    forking.add_argument("--to", required=True, help="the new session's id")
    start = stream.add_mutually_exclusive_group()
    start.add_argument("--reset", action="store_true", help="reset the session first")
    start.add_argument("--resume", action="store_true", help="continue from the server's position")
    args = parser.parse_args(argv)
    if args.command != "stream":
        return _run(args, {"export": export_state, "import": import_state, "fork": fork}[args.command])
    if args.chunk < 1 or args.window < 1:
        parser.error("--chunk and --window must be at least 1")
    for option, path in (("--out", args.out), ("--plot", args.plot)):  # refused before anything is sent
        if path is not None and not os.access(path.parent, os.W_OK):
            parser.error(f"{option} {path}: {path.parent} is not a directory this user can write in")
    if args.out is not None and args.out.resolve() == args.csv.resolve():  # the series would be replaced
        parser.error(f"--out {args.out} is the --csv file; the predictions go to a file of their own")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401  (only --plot needs it: checked before anything is sent)
        except ModuleNotFoundError:
            parser.exit(2, f"--plot needs the client extra (matplotlib is missing): {INSTALL}\n")
    # A stop from outside (docker stop, systemd, a closed terminal) saves the answers as Ctrl-C does: a file
    # left more than a chunk behind its session could not be resumed. An ignored signal stays ignored (nohup).
    for stop in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if stop is not None and signal.getsignal(stop) == signal.SIG_DFL:
            signal.signal(stop, _interrupt)
    return _run(args, stream_csv)


# What a stop in mid-call leaves that its user must know: the service may have done what was asked all the same.
_DONE_ALL_THE_SAME = {"import": "; the service may have imported the state all the same",
                      "fork": "; the service may have made the fork all the same"}


def _run(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """``command``'s exit status, its failure in one line (1), and a stop (Ctrl-C; SIGTERM or SIGHUP while
    streaming) in one line and the shell's 128 + the signal's number: never a traceback."""
    try:
        return command(args)
    except (ServiceError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # a stream's answers are saved (stream_csv said where)
        signum = stop.signum if isinstance(stop, _Stopped) else signal.SIGINT
        print(f"{args.command} interrupted by {signal.Signals(signum).name}{_DONE_ALL_THE_SAME.get(args.command, '')}",
              file=sys.stderr)
        return 128 + signum


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled as Ctrl-C is."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise _Stopped(signum)


if __name__ == "__main__":
    sys.exit(main())
