"""Sandboxed, strict template rendering with checked output.

Templates are operator-supplied text, so they run in Jinja2's immutable sandbox with
``StrictUndefined``: a typo in a template is a :class:`RenderError`, never an empty string that
silently boots a machine with half a command line. Output is validated before it leaves: an iPXE
script starts with ``#!ipxe`` (iPXE decides the image type by it), a kernel command line is one
line (iPXE and pxelinux read one line), and cloud-config parses as YAML.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from netboot.errors import ConfigError, RenderError
from netboot.shipped import templates_dir

if TYPE_CHECKING:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

# Compiled string templates kept (profile cmdlines): far more than any site has profiles.
_MAX_COMPILED = 256


class Renderer:
    def __init__(self, dirs: Sequence[Path], *, logger: logging.Logger | None = None) -> None:
        existing = [Path(d) for d in dirs if Path(d).is_dir()]
        if not existing:
            raise ConfigError(
                "no template directory found",
                key="templates.dir",
                fix=f"set templates.dir, or reinstall netboot: {templates_dir()} is missing",
            )
        self.dirs = existing
        self._log = logger or logging.getLogger(__name__)
        self._jinja: ImmutableSandboxedEnvironment | None = None
        self._strings: dict[str, jinja2.Template] = {}

    @property
    def _env(self) -> ImmutableSandboxedEnvironment:
        """Jinja2's environment, made at the first render: importing Jinja2 was a tenth of
        ``serve``'s start-up, and the shipped templates need no check at start (below)."""
        if self._jinja is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                loader=jinja2.FileSystemLoader([str(d) for d in self.dirs]),
                undefined=jinja2.StrictUndefined,
                autoescape=False,  # none of our outputs is HTML
                keep_trailing_newline=True,
            )
            env.filters["grub_quote"] = grub_quote
            env.filters["grub_args"] = grub_args
            self._jinja = env
        return self._jinja

    def check_all(self, *, shipped: bool = False) -> None:
        """Translate every operator template once at start-up so that a syntax error (or
        an unknown filter or test) stops the server. Only to Python source: byte-compiling
        it was half of ``serve``'s start-up after imports, and happens on a template's first
        use. The shipped templates are checked by the test suite (``shipped=True``), not at
        every start: they are the files the tests ran; so a server without template
        overrides starts without Jinja2."""
        shipped_dir = templates_dir().resolve()
        own = [d for d in self.dirs if shipped or d.resolve() != shipped_dir]
        if not own:
            return
        import jinja2

        loader = self._env.loader
        assert loader is not None  # set in _env
        # Each name as the renderer finds it (the first directory that has it wins).
        names = sorted({n for d in own for n in jinja2.FileSystemLoader(str(d)).list_templates()})
        for name in names:
            if name.endswith(".md"):
                continue
            try:
                source, filename, _ = loader.get_source(self._env, name)
                self._env.compile(source, name, filename, raw=True)
            except jinja2.TemplateSyntaxError as exc:
                raise ConfigError(
                    f"template syntax error: {exc.message}",
                    source=exc.filename or name,
                    line=exc.lineno,
                    fix="fix the Jinja2 syntax on that line",
                ) from exc

    def render(self, name: str, context: Mapping[str, Any]) -> str:
        import jinja2
        import jinja2.sandbox

        try:
            template = self._env.get_template(name)
            return template.render(**context)
        except jinja2.TemplateNotFound as exc:
            raise RenderError(f"template {name!r} not found in {self._dirs_text()}") from exc
        except jinja2.UndefinedError as exc:
            raise RenderError(f"template {name!r}: {exc.message}") from exc
        except jinja2.TemplateError as exc:
            raise RenderError(f"template {name!r}: {exc}") from exc
        except jinja2.sandbox.SecurityError as exc:  # type: ignore[attr-defined]
            raise RenderError(f"template {name!r} tried something unsafe: {exc}") from exc

    def version(self, name: str) -> object:
        """What changes when template ``name`` changes on disk (its compiled form, re-read
        when the file changed); None when it cannot be loaded (rendering then says why)."""
        import jinja2

        try:
            return self._env.get_template(name)
        except jinja2.TemplateError:
            return None

    def render_string(self, source: str, context: Mapping[str, Any], *, what: str) -> str:
        import jinja2

        try:
            return self._compiled(source).render(**context)
        except jinja2.TemplateError as exc:
            raise RenderError(f"{what}: {exc}") from exc

    def _compiled(self, source: str) -> jinja2.Template:
        """The compiled template of ``source`` (a profile's cmdline), compiled once.

        Compiling costs ~100x rendering, and the same few profile cmdlines are rendered for
        every machine of a boot storm. Bounded: templates come from operators' profiles, and
        an edited profile must not leave its old text behind forever.
        """
        template = self._strings.get(source)
        if template is None:
            template = self._env.from_string(source)
            if len(self._strings) >= _MAX_COMPILED:
                self._strings.pop(next(iter(self._strings)))  # the oldest compiled
            self._strings[source] = template
        return template

    def _dirs_text(self) -> str:
        return ", ".join(str(d) for d in self.dirs)

    # checked outputs ---------------------------------------------------------------
    def ipxe(self, name: str, context: Mapping[str, Any]) -> str:
        text = self.render(name, context)
        if not text.startswith("#!ipxe"):
            raise RenderError(f"template {name!r} must start with #!ipxe")
        return text

    def cmdline(self, source: str, context: Mapping[str, Any], *, what: str) -> str:
        text = " ".join(self.render_string(source, context, what=what).split())
        # iPXE's tokenizer treats a token starting with '#' as a comment (exec.c).
        if any(tok.startswith("#") for tok in text.split()):
            raise RenderError(f"{what}: a kernel argument starts with '#', iPXE would drop it")
        return text

    def yaml_document(self, name: str, context: Mapping[str, Any], *, header: str = "") -> str:
        text = self.render(name, context)
        if header and not text.startswith(header):
            raise RenderError(f"template {name!r} must start with {header!r}")
        try:
            # libyaml's parser when PyYAML has it: the pure-Python one was a fifth of the
            # CPU of a /config answer, and every installing device fetches one.
            yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
        except yaml.YAMLError as exc:
            raise RenderError(f"template {name!r} rendered invalid YAML: {exc}") from exc
        return text


def grub_quote(text: str) -> str:
    """One GRUB script word: single-quoted, so that ``$``, ``;``, ``&`` and spaces in a token
    or URL stay literal (GRUB expands nothing inside single quotes, like sh); ``'`` itself is
    closed, escaped and reopened. A newline would end the command: refused."""
    if "\n" in text or "\r" in text:
        raise RenderError("a GRUB word cannot contain a line break")
    return "'" + text.replace("'", "'\\''") + "'"


def grub_args(cmdline: str) -> str:
    """A kernel command line as GRUB ``linux`` arguments, each word quoted (GRUB joins them
    with single spaces into the command line it hands the kernel)."""
    return " ".join(grub_quote(word) for word in cmdline.split())
