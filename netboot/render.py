"""Sandboxed, strict template rendering with checked output.

Templates are operator-supplied text, so they run in Jinja2's immutable sandbox with
``StrictUndefined``: a typo in a template is a :class:`RenderError`, never an empty string that
silently boots a machine with half a command line. Output is validated before it leaves: an iPXE
script starts with ``#!ipxe`` (iPXE decides the image type by it), a kernel command line is one
line (iPXE and pxelinux read one line), and cloud-config parses as YAML.
"""

from __future__ import annotations

import errno
import json
import logging
import marshal
import math
import os
import re
import secrets
import select
import stat
import time
from collections import ChainMap, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from netboot.arrival import arrival
from netboot.errors import ConfigError, RenderError, caused
from netboot.model import mypyc_attr
from netboot.shipped import templates_dir

if TYPE_CHECKING:
    import jinja2
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

# Compiled string templates kept (profile cmdlines): far more than any site has profiles.
_MAX_COMPILED = 256
# Split forms kept (_Split): one per template file version or command-line source.
_MAX_SPLITS = 256
# Values frozen (Renderer.freeze): one per profile version, of which a site has a few.
_MAX_FROZEN = 1024
# Skeletons kept per split form: one per distinct value of what is not per machine (profile,
# plan reason, console...): a few per profile and cluster in practice.
_MAX_SKELETONS = 256
# YAML shapes kept (_YamlShapes): one per template version and distinct text around the
# per-machine values (profile, cluster, plan reason...), and per shape its checked forms.
_MAX_SHAPES = 256
_MAX_SHAPE_FORMS = 64
# A template's texts checked by its forms' patterns (_YamlShapes.matches) while fewer than this
# many in a row missed them.
_PLAIN_MISSES = 16
# Forms' patterns (and their last texts' values) kept at most, for all templates (~10-20 KiB
# each, compiled, with a CA): a few per template and profile in practice.
_MAX_PATTERNS = 256
# Without a word from inotify, template files are still checked (their mtime) this often: what
# inotify does not see (a symlinked file edited where it lives, a network file system's remote
# writer) is followed within it.
RECHECK_SECONDS = 1.0
# inotify(7): a file written, its attributes (mtime) set, or a name made, removed or renamed in
# a watched directory (an editor's save by rename).
_IN_MASK = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
# Template directories watched at most: past it, files are checked at every use, as before.
_MAX_WATCHED = 256


def _check_sandboxed(tree: nodes.Template, filename: str) -> None:
    """Refuse a template that reads an attribute the sandbox never allows (a name starting
    with ``_``: ``__class__``, ``__globals__``, ...; jinja2.sandbox.is_safe_attribute), by
    ``.name``, ``["name"]`` or ``|attr("name")``. Rendered, it raises SecurityError at every
    boot of the machines it serves; found here, it stops start-up naming the line, as a
    syntax error does."""
    from jinja2 import nodes

    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        attr: object = None
        if isinstance(node, nodes.Getattr):
            attr = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            attr = node.arg.value
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args \
                and isinstance(node.args[0], nodes.Const):
            attr = node.args[0].value
        if isinstance(attr, str) and attr.startswith("_"):
            raise ConfigError(f"template reads {attr!r}, which the sandbox refuses",
                              source=filename, line=node.lineno,
                              fix="use the variables of templates/README.md; names starting "
                                  "with '_' are never readable")


class Renderer:
    def __init__(self, dirs: Sequence[Path], *, logger: logging.Logger | None = None,
                 volatile: frozenset[str] = frozenset(), stable: frozenset[str] = frozenset(),
                 recheck: float = RECHECK_SECONDS) -> None:
        """``volatile``: the context names whose values differ from one machine to the next
        (and ``name.key`` for a dict of which only that key does), around which :meth:`ipxe`,
        :meth:`cmdline` and :meth:`yaml_config` split their templates (render's, _Split).
        ``recheck``: seconds after which template files are checked again without a word
        from inotify (:meth:`generation`)."""
        existing = [Path(d) for d in dirs if Path(d).is_dir()]
        if not existing:
            raise ConfigError(
                "no template directory found",
                key="templates.dir",
                fix=f"set templates.dir, or reinstall netboot: {templates_dir()} is missing",
            )
        self.dirs = existing
        self.volatile = volatile
        self.stable = stable
        self._log = logger or logging.getLogger(__name__)
        self._jinja: ImmutableSandboxedEnvironment | None = None
        self._tojson: Callable[..., str] | None = None  # its tojson filter (_split)
        # That filter's texts of shorter strs, by the str (_tojson): a split's fill reads them
        # without calling it (_Filler).
        self._tojson_texts: dict[str, str] = {}
        # The bounded caches below are OrderedDicts: the oldest entry of a full dict is
        # dropped by popitem(last=False), O(1), where ``next(iter(dict))`` steps over the
        # slots of every entry deleted since the dict last resized (boot._keep says more).
        self._strings: OrderedDict[str, jinja2.Template] = OrderedDict()
        # Split forms (render with ``volatile``): by template object (one per file version,
        # kept with it so that its id is not reused) or by source string.
        self._splits: OrderedDict[object, tuple[object, _Split | None]] = OrderedDict()
        # Whether a config template's join values are only printed (config_join_printing):
        # by template object, kept with it.
        self._join_proofs: OrderedDict[int, tuple[object, bool]] = OrderedDict()
        self._marking: ImmutableSandboxedEnvironment | None = None
        self._names: dict[str, tuple[object, frozenset[str] | None]] = {}  # reads
        self._string_names: OrderedDict[str, frozenset[str] | None] = OrderedDict()
        self._shapes = _YamlShapes()
        self._fresh = _Freshness(self.dirs, self._log, recheck)
        # Kept here, not by _Freshness: a pin holding its owner made a reference cycle, so a
        # dropped renderer's inotify instance was given back only by the cyclic collector
        # (31 held at once in tests/test_render.py, of 128 per user; s40-flake).
        self._pin = _Pin(self._fresh)
        # Values never changed once made (freeze): id() -> its serial (never given twice);
        # the values, kept so that no other object has their id while they are listed.
        self._frozen: dict[int, int] = {}
        self._frozen_kept: list[object] = []
        self._serials = 0

    def generation(self) -> int:
        """A number that changes whenever a template file may have changed since it was
        last read (:class:`_Freshness`)."""
        return self._fresh.generation()

    def text(self, name: str) -> str | None:
        """The text of file ``name`` of the template directories (the first that has it,
        as templates are found), not a template (a default kernel command line); None
        where none has it. Read again only when it may have changed (:class:`_Freshness`)."""
        return self._fresh.text(name)

    def pinned(self) -> _Pin:
        """``with renderer.pinned():`` the template files are checked once, at its start,
        for everything rendered inside (an install script and its command line, a config and
        its): one look at the watch per answer, not one per file. Never across an await."""
        return self._pin

    def freeze(self, value: object) -> None:
        """The caller's word that ``value`` (a ``stable`` name's value: a profile's dict,
        made once per profile version) is never changed from now on, by anyone: a split
        render keys its skeleton by a serial of its own instead of its marshalled content
        (the profile's dict, marshalled twice per first install, was 5.6 % of its loop
        instructions; session 26). A changed profile is a new value, frozen anew."""
        frozen = self._frozen
        if len(frozen) >= _MAX_FROZEN:
            frozen.clear()  # bounded: old profiles' values go (theirs are marshalled again)
            self._frozen_kept.clear()
        self._serials += 1
        frozen[id(value)] = self._serials
        self._frozen_kept.append(value)  # its id is not another's while listed

    def close(self) -> None:
        """Give back the inotify instance (128 per user by default; a test suite's servers
        each held one until collected). Templates used after it are checked at every use."""
        self._fresh.close()

    def _template(self, name: str) -> jinja2.Template:
        """Template ``name`` as its file is now (:class:`_Freshness`)."""
        return self._fresh.template(self._env, name)

    @property
    def _env(self) -> ImmutableSandboxedEnvironment:
        """Jinja2's environment, made at the first render: importing Jinja2 was a tenth of
        ``serve``'s start-up, and the shipped templates need no check at start (below)."""
        if self._jinja is None:
            import jinja2

            env = _sandbox()(
                loader=jinja2.FileSystemLoader([str(d) for d in self.dirs]),
                undefined=jinja2.StrictUndefined,
                autoescape=False,  # none of our outputs is HTML
                keep_trailing_newline=True,
            )
            env.filters["grub_quote"] = grub_quote
            env.filters["grub_args"] = grub_args
            env.filters["ipxe_arg"] = ipxe_arg
            env.filters["ipxe_text"] = ipxe_text
            env.filters["tojson"] = self._tojson = _tojson(self._tojson_texts)
            self._jinja = self._fresh.adopt(env)
        return self._jinja

    @property
    def _marking_env(self) -> ImmutableSandboxedEnvironment:
        """:attr:`_env` whose ``{{ … }}`` outputs come wrapped in marks (its ``finalize``):
        the text of a YAML document is known with the place of every printed value
        (:class:`_YamlShapes`). The marks hold a random nonce, so that neither a template
        nor a value can forge one."""
        if self._marking is None:
            # An overlay's template cache is a copy of its parent's, not shared: adopted too.
            self._marking = self._fresh.adopt(self._env.overlay(finalize=self._shapes.mark))
        assert self._marking is not None
        return self._marking

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
                tree = self._env.parse(source, name, filename)
                _check_sandboxed(tree, filename or name)
                self._env.compile(tree, name, filename, raw=True)
            except jinja2.TemplateSyntaxError as exc:
                raise caused(ConfigError(
                    f"template syntax error: {exc.message}",
                    source=exc.filename or name,
                    line=exc.lineno,
                    fix="fix the Jinja2 syntax on that line",
                ), exc) from exc

    def render(self, name: str, context: Mapping[str, Any], *,
               volatile: frozenset[str] = frozenset()) -> str:
        """Template ``name`` rendered with ``context``. ``volatile``: the context names whose
        values differ from one machine to the next (its MAC, its token): where the template
        only prints them, the rest is rendered once per distinct value of everything else
        and the printed values are filled in (:class:`_Split`), the same text."""
        try:
            return self._rendered(self._template(name), name, context, volatile)
        except Exception as exc:
            # Jinja's exceptions looked up only when one is raised: an import statement per
            # render cost ~1 µs. (The sandbox's SecurityError is a TemplateError.)
            import jinja2

            if isinstance(exc, jinja2.TemplateNotFound):
                raise caused(RenderError(
                    f"template {name!r} not found in {self._dirs_text()}"), exc) from exc
            if isinstance(exc, jinja2.UndefinedError):
                # With its line, as README's Templates section says: the operator's site
                # template named alone, a device's config was a 500 to search (s40-attack).
                raise caused(RenderError(f"template {name!r}{_line_at(exc, name)}: "
                                         f"{exc.message}"), exc) from exc
            if isinstance(exc, jinja2.TemplateError):
                raise caused(RenderError(f"template {name!r}: {exc}"), exc) from exc
            if isinstance(exc, RenderError):
                raise
            raise caused(RenderError(f"template {name!r}{_failed_at(exc, name)}"),
                         exc) from exc

    def version(self, name: str) -> object:
        """What changes when template ``name`` changes on disk (its compiled form, re-read
        when the file changed); None when it cannot be loaded (rendering then says why)."""
        import jinja2

        try:
            return self._template(name)
        except jinja2.TemplateError:
            return None

    def render_string(self, source: str, context: Mapping[str, Any], *, what: str,
                      volatile: frozenset[str] = frozenset()) -> str:
        try:
            return self._rendered(self._compiled(source), None, context, volatile, source)
        except Exception as exc:
            import jinja2  # as in render: only once something failed

            if isinstance(exc, jinja2.TemplateError):
                raise caused(RenderError(f"{what}: {exc}"), exc) from exc
            if isinstance(exc, RenderError):
                raise
            raise caused(RenderError(f"{what}{_failed_at(exc, None)}"), exc) from exc

    def _rendered(self, template: jinja2.Template, name: str | None,
                  context: Mapping[str, Any], volatile: frozenset[str],
                  source: str | None = None) -> str:
        """``template`` (of file ``name``, or of ``source``) rendered: by its split form
        where it has one and that answers, else whole."""
        if volatile:
            split = self._split_of(template if name is not None else source, volatile, name)
            if split is not None:
                text = split.text(context, self._frozen, False)
                if text is not None:
                    return text
        return _render(template, context)

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
                self._strings.popitem(last=False)  # the oldest compiled
            self._strings[source] = template
        return template

    def _split_of(self, key: object, volatile: frozenset[str], name: str | None, *,
                  config: bool = False) -> _Split | None:
        """The split form of a template (``key``: its object, of file ``name``) or of a
        source string (``key``), made once; None where it cannot be split. ``config``: of a
        YAML config (``key``: its marking template; :meth:`yaml_config`)."""
        # A template object by identity (the loader makes a new one when its file changes),
        # a source string by value.
        index = id(key) if name is not None else key
        kept = self._splits.get(index)
        if kept is not None and (kept[0] is key if name is not None else kept[0] == key):
            return kept[1]
        env = self._env
        if name is not None:
            loader = env.loader
            assert loader is not None  # set in _env
            source, filename, _ = loader.get_source(env, name)
            # The text read now is the one the template object was compiled from only
            # while that object is up to date (Jinja's own test: the file's mtime).
            if not key.is_up_to_date:  # type: ignore[attr-defined]
                return None
        else:
            assert isinstance(key, str)
            source, filename = key, None
        try:
            split = _split(env, source, name, filename, volatile, self.stable, config=config,
                           tojson=self._tojson, texts=self._tojson_texts)
        except Exception:  # a tree the split cannot compile: rendered whole, as it was
            self._log.debug("template %r not split", name or source, exc_info=True)
            split = None
        if len(self._splits) >= _MAX_SPLITS:
            self._splits.popitem(last=False)  # the oldest
        self._splits[index] = (key, split)
        return split

    def _dirs_text(self) -> str:
        return ", ".join(str(d) for d in self.dirs)

    # checked outputs ---------------------------------------------------------------
    def ipxe(self, name: str, context: Mapping[str, Any]) -> str:
        text = self.render(name, context, volatile=self.volatile)
        if not text.startswith("#!ipxe"):
            raise RenderError(f"template {name!r} must start with #!ipxe")
        return text

    def ipxe_with(self, name: str,
                  context: Callable[[frozenset[str] | None], Mapping[str, Any]]) -> str:
        """:meth:`ipxe` with the context ``context(names)`` makes for the names the template
        reads (None: every name, where that cannot be told), as :meth:`yaml_config`: an
        install script reads a third of the context (no join, no register command). Should
        that render fail, it renders again with every name, which says what is wrong as
        before."""
        _, names = self.reads(name)
        if names is not None:
            try:
                made = context(names)
                # render's split form reached at once where it is kept, its template known
                # in this pinned scope (the one its file is now): a storm's every install
                # script, without render's, _template's, _rendered's and _split_of's calls
                # (s35-loop). Else render's way, which says what fails.
                fresh, env = self._fresh, self._jinja
                template = None
                if fresh._pins and env is not None and self.volatile:
                    template = fresh._checked.get((env, name))
                    if template is None:
                        # Not yet checked in this pin (always so without a watch: the pin's
                        # start moved the generation), checked now as render would, so the
                        # kept form answers in both modes (s40-flake). One that fails to
                        # load: render's way says why.
                        try:
                            template = fresh.template(env, name)
                        except Exception:
                            template = None
                kept = self._splits.get(id(template)) if template is not None else None
                if kept is not None and kept[0] is template and kept[1] is not None:
                    text = kept[1].text(made, self._frozen, False)
                    if text is not None and text.startswith("#!ipxe"):
                        return text
                return self.ipxe(name, made)
            except RenderError:
                pass
        return self.ipxe(name, context(None))

    def only_printing(self, name: str, source: str | None) -> bool:
        """Whether template ``name`` (as the current :meth:`pinned` scope has it) and the
        command line ``source`` (None: none) each have their split form (:class:`_Split`),
        made by a render of each before: their ``volatile`` values, by the form's proof from
        the templates' trees, are only printed (whole, through ``or``, ``~`` or ``tojson``)
        and nothing else of them depends on those values (Content._install_frame)."""
        env = self._jinja
        if env is None or not self.volatile or not self._fresh._pins:
            return False
        template = self._fresh._checked.get((env, name))
        kept = self._splits.get(id(template)) if template is not None else None
        if kept is None or kept[0] is not template or kept[1] is None:
            return False
        if source is None:
            return True
        kept = self._splits.get(source)
        return kept is not None and kept[0] == source and kept[1] is not None

    def config_only_printing(self, template: object) -> bool:
        """Whether config template ``template`` (its marking form, as :meth:`reads` gave
        it) has its split form, made by a render of it before (:meth:`yaml_config`): its
        ``volatile`` values are only printed, as :meth:`only_printing` says of a script's
        (Content._config_framed)."""
        kept = self._splits.get(id(template))
        return kept is not None and kept[0] is template and kept[1] is not None

    def config_join_printing(self, template: object, name: str,
                             join: frozenset[str]) -> bool:
        """Whether config template ``template`` (its marking form, as :meth:`reads` gave it,
        of file ``name``) only prints the ``join`` values (``k3s.token``, ``k3s.server_url``)
        as it prints its ``volatile`` ones (whole, through ``or``, ``and``, ``~`` or
        ``tojson``), but for tests of their truth by ``{% if %}`` (``not`` too): the proof
        of :class:`_Split` with them volatile and those tests taken out (Content's config
        frames share one frame across clusters, its key holding whether each is true).
        Found once per template object; False where the file has changed since."""
        kept = self._join_proofs.get(id(template))
        if kept is not None and kept[0] is template:
            return kept[1]
        env = self._env
        loader = env.loader
        assert loader is not None  # set in _env
        try:
            source, filename, _ = loader.get_source(env, name)
        except Exception:  # the render says why
            return False
        if not template.is_up_to_date:  # type: ignore[attr-defined]
            return False  # not the text read now: asked again with the new object
        try:
            proven = _split(env, source, name, filename, self.volatile | join, self.stable,
                            config=True, tojson=self._tojson, texts=self._tojson_texts,
                            truthy=join) is not None
        except Exception:  # a tree the split cannot compile: not proven
            proven = False
        if len(self._join_proofs) >= _MAX_SPLITS:
            self._join_proofs.popitem(last=False)  # the oldest
        self._join_proofs[id(template)] = (template, proven)
        return proven

    def string_reads(self, source: str) -> frozenset[str] | None:
        """The context names template text ``source`` (a command line) reads; None where that
        cannot be told (it takes in another template, or does not parse: its render then
        says why). Found once per text, as :meth:`_compiled` compiles it once."""
        if source in self._string_names:
            return self._string_names[source]
        try:
            tree = self._env.parse(source)
        except Exception:  # rendered with every name, which raises it as a RenderError
            names = None
        else:
            names = _names_read(tree)
        if len(self._string_names) >= _MAX_COMPILED:
            self._string_names.popitem(last=False)  # the oldest
        self._string_names[source] = names
        return names

    def cmdline(self, source: str, context: Mapping[str, Any], profile: str) -> str:
        """Profile ``profile``'s kernel command line ``source`` rendered, on one line (its
        name by position, the errors' "profile NAME cmdline" made only for an error: that
        text and the keyword were ~850 of every install script's loop instructions,
        s40-http1st)."""
        # render_string's split form reached at once where it is kept and answers (a storm's
        # every command line: render_string's, _compiled's, _rendered's and _split_of's calls
        # skipped, s35-loop); else its way, which compiles and says what fails.
        kept = self._splits.get(source) if self.volatile else None
        raw = kept[1].text(context, self._frozen, False) \
            if kept is not None and kept[1] is not None else None
        if raw is None:
            raw = self.render_string(source, context, what=f"profile {profile} cmdline",
                                     volatile=self.volatile)
        text = " ".join(raw.split())
        # iPXE's tokenizer treats a token starting with '#' as a comment (exec.c). (A text
        # without '#' has none: most command lines, asked once per install.)
        if "#" in text and any(tok.startswith("#") for tok in text.split()):
            raise RenderError(f"profile {profile} cmdline: a kernel argument starts with '#', "
                              "iPXE would drop it")
        return text

    def yaml_document(self, name: str, context: Mapping[str, Any], *, header: str = "") -> str:
        """Template ``name`` rendered, checked to parse as one YAML document.

        The check is a parse of the text, except where the text differs from one already
        parsed only inside printed values whose content cannot change what the YAML says
        (:class:`_YamlShapes`): every installing device fetches a config, and the parse was
        a tenth of the server's CPU per config."""
        return self._yaml(name, context, header, None)

    def yaml_config(self, name: str, context: Callable[[frozenset[str] | None], Mapping[str, Any]],
                    *, header: str = "",
                    read: tuple[jinja2.Template | None, frozenset[str] | None] | None = None,
                    ) -> str:
        """:meth:`yaml_document` with the context ``context(names)`` makes for the names the
        template reads (None: every name, where that cannot be told). Should that render
        fail, it renders again with every name, which says what is wrong as before.
        ``read``: what :meth:`reads` answered for ``name`` inside the same :meth:`pinned`
        scope as this call (the template as its file is now, and its names): not looked up
        again (a config fetch asks it first, for its kept text)."""
        template, names = self.reads(name) if read is None else read
        if template is not None and names is not None:
            try:
                made = context(names)
                if self.volatile:
                    text = self._split_config(name, template, made, header)
                    if text is not None:
                        return text
                return self._yaml(name, made, header, template)
            except RenderError:
                pass
        return self._yaml(name, context(None), header, None)

    def _split_config(self, name: str, template: jinja2.Template, context: Mapping[str, Any],
                      header: str) -> str | None:
        """Config template ``name`` (``template``: its marking form, as its file is now)
        rendered split (:class:`_Split`, the renderer's ``volatile``) where its text is then
        known to parse (:meth:`_Split.text`) and starts with ``header``: the text
        :meth:`_yaml` gives, rendered and checked once per skeleton, not once per machine
        (Jinja's render and the form check were ~120,000 of a first config's ~420,000 loop
        instructions, session 28). Else None: rendered and checked as before."""
        # Kept by the template object, as _split_of keeps it: found here without its call
        # (every config fetch; s35-loop).
        kept = self._splits.get(id(template))
        split = kept[1] if kept is not None and kept[0] is template else self._split_of(
            template, self.volatile, name, config=True)
        if split is None:
            return None
        text = split.text(context, self._frozen, True)
        return text if text is not None and text.startswith(header) else None

    def _yaml(self, name: str, context: Mapping[str, Any], header: str,
              template: jinja2.Template | None) -> str:
        if self._shapes.seen_again(name):
            # A form of this template's texts came back: its text rendered plainly (no
            # marks to cut out), known to parse if it is of such a form (_YamlShapes.matches).
            try:
                text = _render(self._template(name), context)
            except Exception:  # the marked render below says what is wrong, as before
                text = None
            if text is not None and text.startswith(header) \
                    and self._shapes.matches(name, text):
                return text
        marked = self._marked(name, context, template)
        text = self.render(name, context) if marked is None else marked.text
        if header and not text.startswith(header):
            raise RenderError(f"template {name!r} must start with {header!r}")
        if marked is not None and self._shapes.known(marked, name):
            return text
        try:
            # libyaml's parser when PyYAML has it: the pure-Python one was a fifth of the
            # CPU of a /config answer, and every installing device fetches one.
            yaml.load(text, Loader=_LOADER)  # noqa: S506
        except yaml.YAMLError as exc:
            raise caused(RenderError(f"template {name!r} rendered invalid YAML: "
                                     f"{_yaml_problem(exc)}"), exc) from exc
        except Exception as exc:
            # A tagged scalar PyYAML's constructor cannot read (!!float, !!int, !!bool,
            # !!timestamp of a printed value), a lone surrogate libyaml cannot encode: Python's
            # own error, not a YAMLError, whose text is the value ('could not convert string
            # to float: …'), and which left the render uncaught: named by its kind alone
            # (s44-attack).
            raise caused(RenderError(
                f"template {name!r} rendered invalid YAML: a value PyYAML cannot read "
                f"({type(exc).__name__}: a tag such as !!float on a text that is none, or a "
                f"character YAML cannot hold)"), exc) from exc
        if marked is not None:
            self._shapes.learn(marked)
        return text

    def reads(self, name: str) -> tuple[jinja2.Template | None, frozenset[str] | None]:
        """What a config render of template ``name`` (:meth:`yaml_config`) reads besides its
        context: the template as its file is now (an object that changes when the file
        does; None where it cannot be loaded), and the context names it reads (None where
        that cannot be told: it takes in another template, or cannot be loaded)."""
        # One call where there were three (this, its helper, the environment's property):
        # every config fetch and install script asks it (session 32).
        env = self._marking
        if env is None:
            env = self._marking_env
        try:
            template = self._fresh.template(env, name)
        except Exception as exc:
            # Jinja looked up only when one is raised (as in render): an import statement
            # per install script was ~900 of its loop instructions.
            import jinja2

            if isinstance(exc, jinja2.TemplateError):
                return None, None
            raise
        kept = self._names.get(name)
        if kept is not None and kept[0] is template:
            return template, kept[1]
        loader = env.loader
        assert loader is not None  # set in _env
        source, filename, _ = loader.get_source(env, name)
        if not template.is_up_to_date:  # changed since: ask again next time
            return template, None
        names = _names_read(env.parse(source, name, filename))
        self._names[name] = (template, names)
        return template, names

    def _marked(self, name: str, context: Mapping[str, Any],
                template: jinja2.Template | None) -> _Marked | None:
        """The template rendered with its printed values marked; None where that fails or
        is ambiguous (the plain render then answers, or says what is wrong)."""
        try:
            if template is None:
                template = self._fresh.template(self._marking_env, name)
            raw = _render(template, context)
        except Exception:  # the plain render raises it again, as a RenderError
            return None
        return self._shapes.split(raw)


K = TypeVar("K")
V = TypeVar("V")

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# What may be printed where (_YamlShapes) without changing what the YAML says: a double-quoted
# scalar as json.dumps (Jinja's tojson) writes one, in ASCII with the escapes libyaml reads
# (no surrogate \u escape, \ud800 to \udfff: libyaml refuses a low one as a high one, and
# json.dumps writes a lone one of a str that holds it: one the API's JSON would refuse); and
# in a comment or a block scalar's line, printable ASCII (no line break, nothing YAML refuses).
# Possessive, so that inside a whole text's pattern (_YamlShapes.matches) a text that does not
# match fails in linear time; alone or there, it matches what it would without (no run of it
# can be cut another way: a run of the class holds no '"' nor '\\', an escape starts with one).
# Unrolled (a run, then each escape with the run after it): one step of the engine's loop per
# escape, not two (a register command's JSON has ~40; its check was a third faster).
_QUOTED_IN_TEXT = (r'"[\x20\x21\x23-\x5b\x5d-\x7e]*+(?:\\(?:["\\bfnrt]'
                   r'|u(?![dD][89a-fA-F])[0-9a-fA-F]{4})[\x20\x21\x23-\x5b\x5d-\x7e]*+)*+"')
_QUOTED = re.compile(_QUOTED_IN_TEXT)
_PLAIN_LINE = re.compile(r"[\x20-\x7e]*")
# libyaml's line breaks besides LF: a text with one is not told apart by lines here.
_OTHER_BREAKS = ("\r", "\x85", "\u2028", "\u2029")


class _Marked:
    """A rendered text cut at its printed values: ``pieces`` around them, and ``values``."""

    __slots__ = ("pieces", "text", "values")

    def __init__(self, text: str, pieces: tuple[str, ...], values: tuple[str, ...]) -> None:
        self.text = text
        self.pieces = pieces
        self.values = values

    def starts(self) -> list[int]:
        """Where each value starts in ``text``."""
        starts, at = [], 0
        for piece, value in zip(self.pieces, self.values, strict=False):
            at += len(piece)
            starts.append(at)
            at += len(value)
        return starts


class _YamlShapes:
    """YAML documents known to parse by their shape: the text around their printed values.

    A text is parsed (libyaml, as before) the first time its shape is seen; then each
    printed value is classed by where the parse put it: a whole double-quoted scalar that
    is not a mapping key and has no tag or anchor (``q``), or on a comment line (``c``), or
    on a line of a block scalar after some other text (``b``); any other value is kept
    verbatim with the shape (``v``). A later text of that shape, with the same verbatim
    values and, in each other place, a value of its class (``_QUOTED``, ``_PLAIN_LINE``),
    differs from the parsed one only inside scalars and comments that end where they did:
    the same tokens, the same tree of str scalars, so it parses too and is not parsed again.
    Anything else (another shape, a value of another form) is parsed, exactly as before.
    """

    def __init__(self) -> None:
        nonce = secrets.token_hex(8)
        self._open, self._close = f"\x00{nonce}<", f"\x00{nonce}>"
        # pieces -> [(classes, checked verbatim values)]
        self._shapes: OrderedDict[tuple[str, ...], list[tuple[str, set[tuple[str, ...]]]]] = (
            OrderedDict())
        # (template name, line breaks) -> the patterns of its forms found again (matches),
        # and the names that have one.
        self._patterns: OrderedDict[tuple[str, int], list[_FormPattern]] = OrderedDict()
        self._again: dict[str, int] = {}  # name -> misses left (seen_again)
        self._first: dict[str, _FormPattern] = {}  # name -> the pattern last matched
        self._compiled: set[tuple[str, tuple[str, ...], str, tuple[str, ...]]] = set()
        # (pieces, classes) -> the values of the last text of that form (_found_again).
        self._last: dict[tuple[tuple[str, ...], str], tuple[str, ...]] = {}

    def mark(self, value: Any) -> str:
        """Jinja's ``finalize``: a printed value between marks (``str`` as Jinja prints)."""
        return self._open + str(value) + self._close

    def split(self, raw: str) -> _Marked | None:
        """``raw`` cut at its marks; None where they do not pair up (a value printed into
        another, a mark that is not ours)."""
        first, *rest = raw.split(self._open)
        pieces, values = [first], []
        if self._close in first:
            return None
        for part in rest:
            cut = part.split(self._close)
            if len(cut) != 2:
                return None
            values.append(cut[0])
            pieces.append(cut[1])
        if any("\x00" in v for v in values):
            return None
        return _Marked(raw.replace(self._open, "").replace(self._close, ""), tuple(pieces),
                       tuple(values))

    def known(self, marked: _Marked, name: str | None = None) -> bool:
        """Whether ``marked`` is of a form whose text parsed; one found again is then
        looked for in template ``name``'s plain texts too (:meth:`matches`)."""
        for classes, checked in self._shapes.get(marked.pieces, ()):
            if tuple(v for v, c in zip(marked.values, classes, strict=True) if c == "v") \
                    not in checked:
                continue
            if all(c == "v" or (_QUOTED if c == "q" else _PLAIN_LINE).fullmatch(v)
                   for v, c in zip(marked.values, classes, strict=True)):
                if name is not None:
                    key = (marked.pieces, classes)
                    self._found_again(name, marked, classes, self._last.get(key))
                    _keep(self._last, key, marked.values, _MAX_PATTERNS)
                return True
        return False

    def seen_again(self, name: str) -> bool:
        """Whether template ``name``'s texts are to be looked for among its forms found
        again (:meth:`matches`): it has some, and they did not miss many texts in a row
        since the last was found (its texts are then checked by their marks alone, as they
        were, not rendered twice, until another form is found again)."""
        return self._again.get(name, 0) > 0

    def matches(self, name: str, text: str) -> bool:
        """Whether ``text`` (rendered without marks) is of a form of template ``name``
        found again: its pieces with, between them, each value verbatim or one of its class.
        The pattern of a form proves that of the text alone, however the text was cut when it
        was printed: it is the same check as :meth:`known`'s, made without marks (a mark
        costs its value a copy, the cut two passes over the text). Every value class holds no
        line break, so only the forms with the text's count of line breaks are tried.
        The form that matched is tried first the next time (the order decides nothing but
        the cost): a form whose values alike were taken verbatim from one cluster's texts
        (its server URL, its join token) may stand before the one that takes any cluster's,
        and a storm over 8 clusters tried both for 9 texts in 10, the first failing ~1,000
        characters in: 8.2 against 5.8 µs a shipped k3OS config with a CA. That one is tried
        before the line breaks are counted (a fifth of a match): a pattern matches only
        texts of its form, whatever list it is in (or was, before the lists were dropped)."""
        first = self._first.get(name)
        if first is not None and first.fullmatch(text):
            self._again[name] = _PLAIN_MISSES
            return True
        patterns = self._patterns.get((name, text.count("\n")))
        if patterns:
            for i, pattern in enumerate(patterns):
                if pattern.fullmatch(text):
                    self._again[name] = _PLAIN_MISSES
                    if i:
                        patterns.insert(0, patterns.pop(i))
                    _keep(self._first, name, pattern, _MAX_SHAPES)
                    return True
        if name in self._again:
            self._again[name] -= 1
        return False

    def _found_again(self, name: str, marked: _Marked, classes: str,
                     before: tuple[str, ...] | None) -> None:
        """Form ``classes`` of ``marked`` (known to parse) looked for in plain texts from now
        on. Only a form that came back: one with a machine's own verbatim value never
        does, and its pattern would be compiled for each machine. ``before``: the values of
        the form's text before this one; those alike in both are taken verbatim."""
        kinds = "".join("v" if before is not None and before[i] == value else kind
                        for i, (value, kind) in enumerate(zip(marked.values, classes,
                                                              strict=True)))
        form = (name, marked.pieces, kinds,
                tuple(v for v, k in zip(marked.values, kinds, strict=True) if k == "v"))
        if form in self._compiled:
            return  # its pattern is there (or was, and dropped with the oldest)
        key = (name, marked.text.count("\n"))
        patterns = self._patterns.get(key)
        if patterns is None:
            if len(self._patterns) >= _MAX_SHAPES:
                self._patterns.popitem(last=False)  # the oldest
            patterns = self._patterns[key] = []
        if len(self._compiled) >= _MAX_PATTERNS:  # a few in practice: all made again
            self._compiled.clear()
            self._patterns.clear()
            patterns = self._patterns[key] = []
        if len(patterns) < _MAX_SHAPE_FORMS:
            patterns.append(_FormPattern(marked, kinds, before))
        self._compiled.add(form)
        _keep(self._again, name, _PLAIN_MISSES, _MAX_SHAPES)

    def learn(self, marked: _Marked) -> None:
        """Record the shape of ``marked``, whose text has just parsed."""
        classes = _classes(marked)
        if classes is None:
            return
        forms = self._shapes.get(marked.pieces)
        if forms is None:
            if len(self._shapes) >= _MAX_SHAPES:
                self._shapes.popitem(last=False)  # the oldest
            forms = self._shapes[marked.pieces] = []
        verbatim = tuple(v for v, c in zip(marked.values, classes, strict=True) if c == "v")
        for known_classes, checked in forms:
            if known_classes == classes:
                if len(checked) < _MAX_SHAPE_FORMS:
                    checked.add(verbatim)
                return
        if len(forms) < _MAX_SHAPE_FORMS:
            forms.append((classes, {verbatim}))
        _keep(self._last, (marked.pieces, classes), marked.values, _MAX_PATTERNS)


def _keep(kept: dict[K, V], key: K, value: V, bound: int) -> None:
    """``kept[key] = value``, all of ``kept`` let go first when it holds ``bound`` others
    (kept for speed alone: made again as they come back)."""
    if len(kept) >= bound and key not in kept:
        kept.clear()
    kept[key] = value


class _FormPattern:
    """The texts of form ``kinds`` of ``marked`` (its classes, ``v`` also for the values
    alike in the form's text before: not a machine's own): its pieces, each value verbatim
    (``v``) or one of its class. Every repetition is possessive, so a text is matched or
    refused in linear time; a printable value (``c``, ``b``) stops before the character that
    follows it (where one does), which it then may not hold. Both narrow the form: every
    text matched is still of it (another is checked as before, by its marks).

    Matched piece by piece: each run of literal text (the pieces, the verbatim values)
    compared whole, each other value by its class's pattern from where the text before it
    ended. The same answer as one regular expression of the whole form (the tests keep
    one): a sequence of literals and possessive runs, each of which matches in one way from
    where the one before ended; but a literal is compared at memcmp's speed, not a
    character at a time (a CA's PEM verbatim was half of a k3OS config's check).

    A double-quoted value (``q``) that differs from the one of the form's text before
    (``before``) in its plain runs alone is matched first by its own form (:func:`_quoted_form`):
    that text's escapes and the runs alike in both, a possessive plain run where they
    differ; any other quoted value by ``_QUOTED``, in the same pattern's other branch. The
    same answer: what the own form matches is a quote, complete escapes and plain
    characters, a quote, which ``_QUOTED`` matches to the same end."""

    __slots__ = ("parts",)

    def __init__(self, marked: _Marked, kinds: str,
                 before: tuple[str, ...] | None = None) -> None:
        pieces, values = marked.pieces, marked.values
        parts: list[str | re.Pattern[str]] = []
        literal = [pieces[0]]
        for i, (value, kind) in enumerate(zip(values, kinds, strict=True)):
            after = pieces[i + 1]
            if kind == "v":
                literal.append(value)
            else:
                if literal:
                    parts.append("".join(literal))
                own = _quoted_form(before[i], value) if kind == "q" and before else None
                parts.append(own if own is not None else _QUOTED if kind == "q"
                             else re.compile(_printable_but(_stop(values, kinds, i, after))))
                literal = []
            literal.append(after)
        parts.append("".join(literal))
        self.parts = tuple(p for p in parts if p != "")

    def fullmatch(self, text: str) -> bool | None:
        """True where the whole text is of the form, else None (as a pattern's)."""
        at = 0
        for part in self.parts:
            if type(part) is str:
                if not text.startswith(part, at):
                    return None
                at += len(part)
            else:
                assert isinstance(part, re.Pattern)
                found = part.match(text, at)
                if found is None:
                    return None
                at = found.end()
        return True if at == len(text) else None


# A double-quoted scalar's escapes, its text cut at them (_quoted_form): plain runs, each
# maybe empty, and between them the escapes.
_QUOTED_ESCAPE = re.compile(r'(\\u[0-9a-fA-F]{4}|\\.)')
_PLAIN_RUN = r"[\x20\x21\x23-\x5b\x5d-\x7e]*+"  # _QUOTED's plain characters


def _quoted_form(before: str, value: str) -> re.Pattern[str] | None:
    """The pattern of double-quoted value ``value`` whose form's text before had ``before``
    there (see :class:`_FormPattern`): first its own form, its escapes and plain runs, each
    run that differs from ``before``'s at its place a possessive ``_PLAIN_RUN``, the rest
    literal; else ``_QUOTED``. None where the two do not have their escapes at the same
    places, or the own form would be all runs (``_QUOTED`` alone then: as fast). A run
    stands between escapes or the quotes, so ``_PLAIN_RUN`` stops where the literal after it
    starts (an escape's backslash, the closing quote) and takes every plain text there (none
    too): a value whose run needs an escape, or has one more, is ``_QUOTED``'s.
    The literal is compared a character at a time too, but at ~3 times the speed of
    ``_QUOTED``'s class and escapes: 1.0 against 2.5 µs a shipped config's register command
    (~750 characters, ~50 escapes), ~2/3 of the check's regular expressions' work."""
    if not _QUOTED.fullmatch(before) or not _QUOTED.fullmatch(value):
        return None
    mine, theirs = _QUOTED_ESCAPE.split(value[1:-1]), _QUOTED_ESCAPE.split(before[1:-1])
    if len(mine) != len(theirs):
        return None
    own, literal = ['"'], False
    for i, (token, other) in enumerate(zip(mine, theirs, strict=True)):
        if token == other:
            own.append(re.escape(token))
            literal = literal or token != ""
        elif i % 2:
            return None  # another escape there
        else:
            own.append(_PLAIN_RUN)
    if not literal:
        return None
    return re.compile("(?:" + "".join(own) + '"|' + _QUOTED_IN_TEXT + ")")


def _stop(values: tuple[str, ...], kinds: str, i: int, after: str) -> str:
    """The character a printable value ``i`` stops before (see :class:`_FormPattern`)."""
    following = kinds[i + 1] if i + 1 < len(values) else ""
    return after[:1] or (values[i + 1][:1] if following == "v"
                         else '"' if following == "q" else "")


def _printable_but(stop: str) -> str:
    """Printable ASCII (``_PLAIN_LINE``'s), possessive, without ``stop`` where it is one."""
    if not "\x20" <= stop <= "\x7e":
        return r"[\x20-\x7e]*+"
    code = ord(stop)
    ranges = [(0x20, code - 1), (code + 1, 0x7e)]
    return "[" + "".join(f"\\x{a:02x}-\\x{b:02x}" for a, b in ranges if a <= b) + "]*+"


def _classes(marked: _Marked) -> str | None:
    """One class per value of ``marked`` (see :class:`_YamlShapes`), from libyaml's events
    for its text; None where the text is not cut into lines as libyaml cuts it."""
    text = marked.text
    spans = _scalar_spans(text)
    if spans is None:
        return None
    quoted, ranges, blocks = spans
    classes = []
    for start, value in zip(marked.starts(), marked.values, strict=True):
        end = start + len(value)
        if quoted.get(start) == end and _QUOTED.fullmatch(value):
            classes.append("q")
        elif not _PLAIN_LINE.fullmatch(value):
            classes.append("v")
        else:
            classes.append(_line_class(text, start, end, ranges, blocks))
    return "".join(classes)


def fills_in_place(text: str, places: Sequence[tuple[int, int]]) -> bool:
    """Whether YAML ``text`` says the same with any run of ASCII letters, digits and
    ``-_.:`` (a MAC, a token, a hostname as a rule: Content's config frames) in place of
    each of its ``places`` (start, end): each is inside a double-quoted scalar that is no
    mapping key and has no tag or anchor, and not after a backslash (no escape of it), or
    on a comment's line or a block scalar's line after other text (:func:`_classes`' ``c``
    and ``b``). Such a run holds no quote, backslash, line break or ``#``: the scanner
    meets the same tokens, the parser makes the same tree of str scalars. False where the
    text does not parse."""
    try:
        spans = _scalar_spans(text)
    except Exception:  # no parse, no frame: rendered as before
        return False
    if spans is None:
        return False
    quoted, ranges, blocks = spans
    for start, end in places:
        if any(s < start and end < e for s, e in quoted.items()):
            if text[start - 1] == "\\":
                return False
        elif _line_class(text, start, end, ranges, blocks) == "v":
            return False
    return True


def _line_class(text: str, start: int, end: int, ranges: list[tuple[int, int]],
                blocks: list[tuple[int, int]]) -> str:
    """The class of printable ASCII at ``start``:``end`` of ``text`` by its line (see
    :func:`_classes`): ``c`` on a comment line that no scalar reaches into, ``b`` on a line
    of a block scalar below its header after other text, else ``v``."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end
    before = text[line_start:start]
    if before.lstrip(" ").startswith("#") and not any(
            s < line_end and line_start < e for s, e in ranges):
        return "c"  # a comment line that no scalar reaches into
    if before.strip(" ") and any(s < line_start and line_end < e for s, e in blocks):
        # A line of a block scalar below its header (which holds its start), after other
        # text: not in the indentation that the scalar's first line sets.
        return "b"
    return "v"


def _scalar_spans(text: str) -> tuple[dict[int, int], list[tuple[int, int]],
                                      list[tuple[int, int]]] | None:
    """From libyaml's events for ``text``: each double-quoted value scalar's start -> end
    (no mapping key, no tag, no anchor), every scalar's and alias's span, and every block
    scalar's; None where the text is not cut into lines as libyaml cuts it."""
    if any(b in text for b in _OTHER_BREAKS):
        return None
    quoted: dict[int, int] = {}  # start -> end of a double-quoted value scalar
    ranges: list[tuple[int, int]] = []  # every scalar and alias
    blocks: list[tuple[int, int]] = []  # block scalars
    stack: list[list[bool]] = []  # per open collection: [is a mapping, next node is a key]
    for event in yaml.parse(text, Loader=_LOADER):
        kind = type(event)
        is_key = False
        if kind in (yaml.ScalarEvent, yaml.AliasEvent, yaml.MappingStartEvent,
                    yaml.SequenceStartEvent) and stack and stack[-1][0]:
            is_key = stack[-1][1]
            stack[-1][1] = not is_key
        if kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            stack.append([kind is yaml.MappingStartEvent, True])
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            stack.pop()
        elif isinstance(event, yaml.ScalarEvent | yaml.AliasEvent):
            assert event.start_mark is not None and event.end_mark is not None
            start, end = event.start_mark.index, event.end_mark.index
            ranges.append((start, end))
            if not isinstance(event, yaml.ScalarEvent):
                continue
            if event.style == '"' and not is_key and event.tag is None \
                    and event.anchor is None:
                quoted[start] = end
            elif event.style in ("|", ">"):
                blocks.append((start, end))
    return quoted, ranges, blocks


class _Freshness:
    """The one owner of "is this compiled template still its file's text", for every Jinja2
    environment of a renderer (the plain one, the configs' marking overlay): each asks
    :meth:`template`, and Jinja's own per-use check (``auto_reload``: a lock, an LRU and a
    stat() per use) is on only where there is no watch.

    With the inotify watch, nothing is checked while it reads empty (~1.6 µs); a word from it
    drops every compiled template (a new file earlier in the search path, an operator's
    override of a shipped template, is what a file's mtime never shows), and at least every
    ``recheck`` seconds the templates kept are checked by their files' mtimes (what inotify
    does not see: a symlinked file edited where it lives, a network file system's remote
    writer), included ones too. Without inotify, the generation moves at every call and
    Jinja checks each file at each use, as before the watch; and the directories searched
    before the one a template was read from are looked at for a new file of its name."""

    def __init__(self, dirs: Sequence[Path], log: logging.Logger, recheck: float) -> None:
        self._dirs = [str(d) for d in dirs]
        self._paths: dict[str, tuple[str, ...]] = {}  # by name, for _overridden
        # The watch is made at the first use (_started): a server that renders nothing, and
        # each of a test suite's servers, holds no inotify instance (128 per user by default).
        self._unstarted: tuple[Sequence[Path], logging.Logger] | None = (dirs, log)
        self._watch: _Watch | None = None
        self._recheck = recheck
        self._recheck_at = 0.0
        self._generation = 0
        self._envs: list[ImmutableSandboxedEnvironment] = []
        # Templates by environment and name as last checked, valid while the generation is.
        self._checked: dict[tuple[ImmutableSandboxedEnvironment, str], jinja2.Template] = {}
        # Plain files by name (text()): (generation, text) as last checked, and by path
        # ((inode, size, mtime), text) as last read.
        self._texts: dict[str, tuple[int, str | None]] = {}
        self._read: dict[str, tuple[tuple[int, int, int], str]] = {}
        self._pins = 0  # open pin scopes (_Pin): the generation is not looked at again
        # time.monotonic() just before the watch was last looked at (-inf: never, or no
        # watch): a request that had arrived before it is answered by that look (generation).
        self._looked = -math.inf

    def adopt(self, env: ImmutableSandboxedEnvironment) -> ImmutableSandboxedEnvironment:
        """``env``, whose templates are now checked here."""
        env.auto_reload = self._started() is None
        self._envs.append(env)
        return env

    def generation(self) -> int:
        """A number that changes whenever a template file may have changed since it was
        last read; inside a pin (:class:`_Pin`), the one its start read."""
        if self._pins:
            return self._generation
        came = arrival()
        if came is not None and came < self._looked:
            # The watch was looked at after this request had arrived: that look saw every
            # change made before the request was sent (inotify queues the event in the
            # system call that makes the change; netboot.arrival), so it answers for this
            # one too. The requests of one loop iteration's reads share one poll(2), which
            # gives up the GIL (the store's writer thread takes it): one per first install
            # was ~5 % of the loop's wall time in py-spy's samples (session 30).
            return self._generation
        watch = self._watch if self._unstarted is None else self._started()
        now = time.monotonic()  # before the look: what arrived before it, it sees
        if watch is not None:
            if watch.changed():
                for env in self._envs:
                    if env.cache is not None:
                        env.cache.clear()
                self._recheck_at = 0.0
            self._looked = now  # once the look is done (a failed one answers for no one)
        if watch is None or now >= self._recheck_at:
            self._generation += 1
            self._checked.clear()
            self._recheck_at = now + self._recheck
            if watch is not None:
                self._sweep()
        return self._generation

    def close(self) -> None:
        """The watch closed: from now on every use checks the files (as without inotify)."""
        watch, self._watch, self._unstarted = self._watch, None, None
        self._looked = -math.inf  # no look answers for a later use any more
        if watch is not None:
            watch.close()
            for env in self._envs:
                env.auto_reload = True

    def text(self, name: str) -> str | None:
        """File ``name``'s text from the first directory that has it (None: none has),
        looked for again when the generation moved, and read again only when its inode,
        size or mtime changed (every install script and config reads a command line)."""
        generation = self.generation()
        kept = self._texts.get(name)
        if kept is not None and kept[0] == generation:
            return kept[1]
        text = None
        for path in self._paths_of(name):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            seen = (st.st_ino, st.st_size, st.st_mtime_ns)
            read = self._read.get(path)
            if read is None or read[0] != seen:
                with open(path, encoding="utf-8") as f:
                    read = self._read[path] = (seen, f.read())
            text = read[1]
            break
        self._texts[name] = (generation, text)
        return text

    def _started(self) -> _Watch | None:
        if self._unstarted is not None:
            dirs, log = self._unstarted
            self._watch, self._unstarted = _Watch.of(dirs, log), None
        return self._watch

    def template(self, env: ImmutableSandboxedEnvironment, name: str) -> jinja2.Template:
        """Template ``name`` of ``env`` (one :meth:`adopt` returned), as its file is now."""
        if not self._pins:  # inside a pin, the generation its start read (no call)
            self.generation()
        key = (env, name)
        template = self._checked.get(key)
        if template is None:
            template = env.get_template(name)
            if self._watch is None and self._overridden(template.filename, name):
                # An operator's override made since: no watch said so, no mtime shows it.
                if env.cache is not None:
                    env.cache.clear()
                template = env.get_template(name)
            self._checked[key] = template
        return template

    def _overridden(self, filename: str | None, name: str) -> bool:
        """Whether a file for ``name`` now stands in a directory searched before the one
        ``filename`` was read from (the loader's search, as FileSystemLoader's): one stat()
        per such directory. A file removed since its template was read, Jinja's own check
        sees."""
        for path in self._paths_of(name):
            if path == filename:
                return False
            if os.path.isfile(path):
                return True
        return False

    def _paths_of(self, name: str) -> tuple[str, ...]:
        """Where file ``name`` is looked for, in search order."""
        paths = self._paths.get(name)
        if paths is None:  # joined once: the joins were most of a check
            paths = self._paths[name] = tuple(
                os.path.normpath(os.path.join(top, *name.split("/"))) for top in self._dirs)
        return paths

    def _sweep(self) -> None:
        """Drop the compiled templates whose file's mtime moved: Jinja's own up-to-date
        test, made here once per ``recheck`` instead of at every use (auto_reload)."""
        for env in self._envs:
            cache = env.cache
            if cache is None:
                continue
            for key, template in cache.items():
                if not template.is_up_to_date:
                    del cache[key]


class _Pin:
    """:meth:`Renderer.pinned`'s scope: the watch is read at its start, and not again before
    its end (nested scopes count; one render answers one request: one moment)."""

    __slots__ = ("_fresh",)

    def __init__(self, fresh: _Freshness) -> None:
        self._fresh = fresh

    def __enter__(self) -> None:
        fresh = self._fresh
        if not fresh._pins:
            fresh.generation()
        fresh._pins += 1

    def __exit__(self, *exc: object) -> None:
        self._fresh._pins -= 1


class _Watch:
    """An inotify(7) descriptor watching the template directories and their subdirectories:
    whether anything in them changed since the last :meth:`changed`. An event is queued by
    the system call that made the change, so a change is seen by the next render."""

    def __init__(self, fd: int, add: Callable[[int, bytes, int], int], dirs: Sequence[Path],
                 ) -> None:
        self._fd, self._add, self._dirs = fd, add, dirs
        # Whether an event waits, asked of poll(2): a read of the empty descriptor raised
        # BlockingIOError, ~5 µs against ~1 µs (every install script and config asks).
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._whole = self._watch_all()

    @classmethod
    def of(cls, dirs: Sequence[Path], log: logging.Logger) -> _Watch | None:
        """The watch, or None where inotify is not available (not Linux, no descriptor or
        watch left: ``max_user_watches``; too many directories): templates are then stat()ed
        at every use."""
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            watch = cls(fd, libc.inotify_add_watch, dirs)
        except (OSError, AttributeError) as exc:
            # Said once per renderer, at its first render, as a warning: nothing is wrong in
            # what is served, but every use now stats its files, and a test that counts
            # renders sees the other mode (s40-flake).
            if isinstance(exc, OSError) and exc.errno == errno.EMFILE:
                log.warning("template files checked at every use: no inotify instance left "
                            "(fs.inotify.max_user_instances=%s per user, all in use, or this "
                            "process's open-file limit); raise it (sysctl "
                            "fs.inotify.max_user_instances=512) or stop what holds them",
                            _proc_value("/proc/sys/fs/inotify/max_user_instances"))
            else:
                log.warning("template files checked at every use: no inotify (%s)", exc)
            return None
        if not watch._whole:
            log.warning("template files checked at every use: not every template directory "
                        "could be watched (fs.inotify.max_user_watches=%s reached, or more "
                        "than %d directories under %s)",
                        _proc_value("/proc/sys/fs/inotify/max_user_watches"), _MAX_WATCHED,
                        ", ".join(str(d) for d in dirs))
            watch.close()
            return None
        return watch

    def close(self) -> None:
        """The descriptor closed (once: by the renderer's close, or when collected)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    # Not weakref.finalize: mypyc's native classes (NETBOOT_MYPYC=1 builds this module) take
    # no weak references.
    def __del__(self) -> None:
        self.close()

    def _watch_all(self) -> bool:
        """Whether every directory is watched (false: out of watches, or more directories
        than _MAX_WATCHED: a templates.dir set to a big tree, or a symlink loop)."""
        whole, count = True, 0
        for top in self._dirs:
            # Jinja's loader follows symlinked subdirectories: so does the watch.
            for here, _, _ in os.walk(top, followlinks=True):
                count += 1
                if count > _MAX_WATCHED:
                    return False
                whole &= self._add(self._fd, os.fsencode(here), _IN_MASK) >= 0
        return whole

    def changed(self) -> bool:
        if not self._whole:  # a directory not watched: checked at every use
            return True
        if not self._poll.poll(0):
            return False
        # Drained (a burst of events reads as one change); a directory made since gets its
        # watch (adding one again is harmless).
        while True:
            try:
                if not os.read(self._fd, 65536):
                    break
            except BlockingIOError:
                break
        self._whole = self._watch_all()
        return True


def _proc_value(path: str) -> str:
    """A /proc/sys setting as written there ("?" where it cannot be read), for a message."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "?"


# Where a printed per-machine value goes in a skeleton: NUL never occurs in a rendered script,
# and a skeleton that has one anywhere else is not used.
_MARK = re.compile("\x00([0-9]+)\x00")
# Nodes whose effect the split does not follow (other templates, macros, scopes, the context
# itself): a template with one is rendered whole.
_OPAQUE = ("Extends", "Include", "Import", "FromImport", "Macro", "CallBlock", "Block",
           "FilterBlock", "With", "Scope", "OverlayScope", "EvalContextModifier",
           "ScopedEvalContextModifier", "ContextReference", "DerivedContextReference",
           "ImportedName", "InternalName")
# Names Jinja binds itself inside loops, macros and call blocks.
_SPECIAL = frozenset({"loop", "self", "caller", "varargs", "kwargs", "super"})


class _Unsure(Exception):
    """A split render cannot tell what the whole render gives (an undefined value, an
    error): the whole render answers, and says why."""


def _names_read(tree: Any) -> frozenset[str] | None:
    """The context names a parsed template reads; None where that cannot be told (it takes in
    another template, whose names are not in this tree)."""
    from jinja2 import meta, nodes

    taken = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)
    if any(True for _ in tree.find_all(taken)):
        return None
    names = frozenset(meta.find_undeclared_variables(tree))
    return names | _keys_read(tree, "machine") if "machine" in names else names


# In a template's names (_names_read): the name's dict is read other than key by key.
WHOLE = ".*"


def _keys_read(tree: Any, name: str) -> frozenset[str]:
    """``name.KEY`` for each key of context dict ``name`` that ``tree`` reads by a constant
    attribute or subscript (``machine.hostname``, ``machine["uuid"]``), and ``name.*`` where
    it uses the dict otherwise (prints, iterates, filters it, or asks for an attribute a
    dict has: ``machine.items``): a context may then give the dict with those keys alone
    and every lookup answers as the whole dict's would (Content.context's machine; making
    all of it was 4 % of a first install's loop). Every load of the name counts, even of a
    loop variable or a ``set`` that shadows it: that only adds keys."""
    from jinja2 import nodes

    keys = set()
    seen: set[int] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        inner = node.node
        if not (isinstance(inner, nodes.Name) and inner.name == name and inner.ctx == "load"):
            continue
        if isinstance(node, nodes.Getattr):
            key = node.attr
            if hasattr(dict, key):  # Jinja's getattr finds the method before the key
                continue
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            key = node.arg.value
        else:
            continue
        keys.add(f"{name}.{key}")
        seen.add(id(inner))
    if any(n.name == name and n.ctx == "load" and id(n) not in seen
           for n in tree.find_all(nodes.Name)):
        keys.add(name + WHOLE)
    return frozenset(keys)


class _Skeleton:
    """A split template's text for one value of what is not per machine (:class:`_Split`):
    its literal pieces with a place between each two (:func:`_slots`), the filled value of
    each place in order (None: the values' own order, each once), and for a YAML config
    the check its filled values must pass for the text to be known to parse (None: not
    known that way; see :func:`_yaml_checks`)."""

    __slots__ = ("check", "order", "slots")

    def __init__(self, pieces: list[str], order: tuple[int, ...] | None,
                 check: Callable[[list[str], bool], bool] | None) -> None:
        self.slots = _slots(pieces)
        self.order = order
        self.check = check


# A filled value's check (_yaml_checks, _checker): tojson's text as a double-quoted scalar,
# another value as one, a value on a comment's or a block scalar's line.
_JSON, _QUOTE, _LINE = 0, 1, 2


class _Split:
    """A template whose per-machine values (the ``volatile`` context names, and the
    ``name.key`` entries of a dict whose other keys are not: ``k3s.node_name``) are only
    printed: in whole ``{{ … }}`` outputs of plain lookups (``{{ mac }}``,
    ``{{ machine.hostname or mac }}``, ``{{ ("node-" ~ mac_hexhyp) | tojson }}``), or as the
    items of a loop over one (``{% for a in k3s.args %}- {{ a | tojson }}{% endfor %}``)
    that only prints its item so; nothing else of it (a test, another filter, a variable it
    sets) depends on them. Its skeleton (the template with a mark where each such output
    goes, each item of such a loop a mark) is rendered once per distinct value of the other
    names and keys it reads (and length of each such loop); a render is then that skeleton
    with each mark replaced by ``str()`` of its value, found as Jinja's generated code finds
    it (``environment.getattr``/``getitem``, ``or``, ``~``, the environment's ``tojson``;
    :class:`_Filler`): the very text a whole render gives. Anything the split cannot be
    sure of (an undefined value, an input it cannot key on) leaves the render to the whole
    template."""

    __slots__ = ("checkers", "config", "count", "fill", "json", "loops", "names", "proven",
                 "skeletons", "spliced", "template")

    def __init__(self, template: jinja2.Template, names: tuple[str, ...],
                 fill: Callable[[Mapping[str, Any], dict[int, int]],
                                tuple[list[str], tuple[Any, ...], bool]],
                 json: tuple[bool, ...], *, loops: tuple[tuple[bool, ...], ...] = (),
                 config: bool = False, proven: bool = False,
                 spliced: tuple[int, ...] = ()) -> None:
        self.template = template
        self.names = names  # the other names it reads: what a skeleton is given
        # The values filled in, and what keys the skeleton (:class:`_Filler`).
        self.fill = fill
        self.count = len(json)  # outputs filled in (before the loops' items)
        self.json = json  # per output: whether its value is the environment's tojson's text
        self.loops = loops  # per loop, per output of its item: through tojson or not
        self.config = config  # a YAML config's: each skeleton gets its checks
        self.proven = proven  # its tojson is the renderer's (_checker's _JSON)
        # The outputs whose value's Splice (or None) the key holds, before the loops' lengths:
        # a Spliced of plain values is filled in as its values (_Filler.output).
        self.spliced = spliced
        # What is not per machine (_Filler's key) -> the skeleton.
        self.skeletons: OrderedDict[tuple[Any, ...], _Skeleton] = OrderedDict()
        # A config's skeletons' checks (_yaml_checks) -> their function (_checker): the same
        # for most of them (a few in all, bounded by the skeletons').
        self.checkers: dict[tuple[tuple[int, int], ...], Callable[[list[str], bool], bool]] = {}

    def text(self, context: Mapping[str, Any], frozen: dict[int, int], checked: bool,
             ) -> str | None:
        """The text, or None: render the whole template. ``frozen``: values never changed
        once made (Renderer.freeze), by their serial. ``checked`` (a YAML config's): only a
        text known to parse as YAML, its skeleton with placeholders parsed and each filled
        value of its place's class (:func:`_yaml_checks`); else None (rendered and checked
        whole)."""
        # One call where there were four or five (this, the fill's and skeleton's helpers,
        # the join's), for every install script and config a device fetches (~3,500 of a
        # first config's loop instructions, session 32).
        try:
            filled, key, ascii = self.fill(context, frozen)
            skeleton = self.skeletons.get(key)
            if skeleton is None:
                skeleton = self._made(context, key)
        except Exception:  # the whole render raises it, or says why (RenderError)
            return None
        if skeleton is None:
            return None
        if checked:
            check = skeleton.check
            if check is None or not check(filled, ascii):
                return None
        order = skeleton.order
        # C calls alone (_filled's copy, slice assignment and join): a %-format of a
        # config's skeleton parsed its ~1,500 characters again, ~8,800 instructions.
        pieces = skeleton.slots.copy()
        pieces[1::2] = filled if order is None else [filled[i] for i in order]
        return "".join(pieces)

    def _made(self, context: Mapping[str, Any], key: tuple[Any, ...]) -> _Skeleton | None:
        """The skeleton of ``key`` (not kept yet) made and kept; None where it cannot be."""
        end = len(key) - len(self.loops)  # their lengths end the key
        skeleton = self._skeleton(context, key[end:], key[end - len(self.spliced):end])
        if skeleton is None:
            return None
        if len(self.skeletons) >= _MAX_SKELETONS:
            self.skeletons.popitem(last=False)  # the oldest
        self.skeletons[key] = skeleton
        return skeleton

    def _skeleton(self, context: Mapping[str, Any], lengths: tuple[Any, ...],
                  splices: tuple[Any, ...]) -> _Skeleton | None:
        ctx = {name: context[name] for name in self.names if name in context}
        json: list[bool] = []
        # A spliced output's first mark -> tojson's text of its fixed texts (_splice_form):
        # its values' marks go between them.
        groups: dict[int, list[str]] = {}
        spliced = dict(zip(self.spliced, splices, strict=True))
        count = 0
        for i in range(self.count):
            splice = spliced.get(i)
            if splice is None:
                ctx[f"_nb_slot_{i}"] = f"\x00{count}\x00"
                json.append(self.json[i])
                count += 1
                continue
            form = groups[count] = _splice_form(splice)
            width = len(splice.fixed) - 1
            ctx[f"_nb_slot_{i}"] = _filled(form, [f"\x00{count + k}\x00" for k in range(width)])
            json += [True] * width
            count += width
        for j, (outs, length) in enumerate(zip(self.loops, lengths, strict=True)):
            # Each item a tuple of marks, one per output of it in the body (there its
            # ``item[k]``), numbered as _Filler fills them.
            items = []
            for _ in range(length):
                items.append(tuple(f"\x00{count + k}\x00" for k in range(len(outs))))
                json.extend(outs)
                count += len(outs)
            ctx[f"_nb_loop_{j}"] = items
        text = self.template.render(ctx)
        parts = _MARK.split(text)
        if text.count("\x00") != len(parts) - 1:
            return None  # a NUL of its own: marks not told apart
        order = tuple(int(p) for p in parts[1::2])
        pieces = parts[::2]
        check = None
        cut = _collapsed(pieces, order, groups) if self.config else None
        if cut is not None:
            checks = _yaml_checks(cut[0], cut[1], json, self.proven)
            if checks is not None and groups:
                # A spliced output's text (plain values between JSON's escapes) is a _QUOTED
                # one whatever its values: checked as one place, its values then need none.
                checks = (None if any(i in groups and kind != _JSON for i, kind in checks)
                          else tuple(c for c in checks if c[0] not in groups))
            if checks is not None:
                check = self.checkers.get(checks)
                if check is None:
                    check = self.checkers[checks] = _checker(checks)
        return _Skeleton(pieces, None if order == tuple(range(count)) else order, check)


def _collapsed(pieces: list[str], order: tuple[int, ...], groups: dict[int, list[str]],
               ) -> tuple[list[str], tuple[int, ...]] | None:
    """``pieces`` and ``order`` with each spliced output's places (``groups``: its first
    mark -> its form, _Split._skeleton) one place, its first mark's, and its fixed texts cut
    from the pieces around: the text its checks are made of (its tojson text one double-quoted
    value). None where a spliced output's text is not found so."""
    if not groups:
        return pieces, order
    cut, places = [pieces[0]], []
    at = 0
    while at < len(order):
        mark = order[at]
        form = groups.get(mark)
        if form is None:
            places.append(mark)
            cut.append(pieces[at + 1])
            at += 1
            continue
        fixed = form[::2]
        width = len(fixed) - 1
        if (order[at:at + width] != tuple(range(mark, mark + width))
                or not cut[-1].endswith(fixed[0])
                or pieces[at + 1:at + width] != fixed[1:width]
                or not pieces[at + width].startswith(fixed[-1])):
            return None
        cut[-1] = cut[-1][:len(cut[-1]) - len(fixed[0])]
        places.append(mark)
        cut.append(pieces[at + width][len(fixed[-1]):])
        at += width
    return cut, tuple(places)


def _yaml_checks(pieces: list[str], order: tuple[int, ...], json: list[bool],
                 proven: bool = False) -> tuple[tuple[int, int], ...] | None:
    """What the values filled into a skeleton (its literal ``pieces``, the value of each
    place between them ``order``, tojson's text or not by value ``json``) must be for its
    text to parse as YAML, as :class:`_YamlShapes` knows a text by its form: the skeleton
    parsed once with a placeholder at each place (``"x"`` for tojson's text, ``x`` else), each
    place classed by where the parse put it; every place a whole double-quoted scalar (then
    each value a ``_QUOTED`` one: ``_JSON`` or ``_QUOTE``) or on a comment's or a block
    scalar's line (each value a ``_PLAIN_LINE``: ``_LINE``). A text of that form with such
    values has the same tokens, the same tree of str scalars: it parses too. None where a
    place is of no such class (a value taken verbatim: a machine's own would never be
    again), or the skeleton does not parse so: the text is then checked whole."""
    values = tuple('"x"' if json[i] else "x" for i in order)
    marked = _Marked("".join(p + v for p, v in zip(pieces, (*values, ""), strict=True)),
                     tuple(pieces), values)
    try:
        yaml.load(marked.text, Loader=_LOADER)  # noqa: S506
        classes = _classes(marked)
    except Exception:  # the whole text's check says what is wrong
        return None
    if classes is None or "v" in classes:
        return None
    return tuple(sorted({(i, _LINE if c != "q" else _JSON if json[i] and proven else _QUOTE)
                         for i, c in zip(order, classes, strict=True)}))


def _checker(checks: tuple[tuple[int, int], ...]) -> Callable[[list[str], bool], bool]:
    """Whether filled values pass ``checks`` (:func:`_yaml_checks`), in one function (a loop
    over them cost ~1,000 instructions a value): ``check(filled, ascii)``. A ``_JSON`` value
    is the renderer's tojson's text (the JSON encoder's escapes, HTML's characters escaped
    too): of a str of ASCII alone (``ascii``: every such value's was, _Filler), a JSON
    string of printable ASCII and escapes none of which is a surrogate's (``\\ud800``, which
    ``_QUOTED`` refuses): a ``_QUOTED`` text; else it is matched by ``_QUOTED``, as a
    ``_QUOTE`` value is. A ``_LINE`` value is printable ASCII (``_PLAIN_LINE``'s class, by
    two C calls: its regular expression cost ~1,500 instructions a value)."""
    json: list[str] = []
    rest: list[str] = []
    for i, kind in checks:
        value = f"f[{i}]"
        if kind == _LINE:
            rest.append(f"ia({value}) and ip({value})")
        else:
            (json if kind == _JSON else rest).append(f"quoted({value}) is not None")
    namespace: dict[str, Any] = {"ia": str.isascii, "ip": str.isprintable,
                                 "quoted": _QUOTED.fullmatch}
    terms = ["(a or " + " and ".join(["True", *json]) + ")", *rest]
    source = "def check(f, a):\n    return " + " and ".join(terms)
    exec(compile(source, "<netboot check>", "exec"), namespace)  # noqa: S102
    check: Callable[[list[str], bool], bool] = namespace["check"]
    return check


def _dict_key(node: nodes.Getattr | nodes.Getitem) -> str | None:
    """The key ``node`` reads of a dict by a constant attribute or subscript, where the
    sandbox's look-up of either finds that item or nothing (no dict attribute by that name:
    ``d.items`` is the method, ``d["items"]`` of a dict without it too); else None."""
    from jinja2 import nodes

    if isinstance(node, nodes.Getattr):
        key = node.attr
    elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        key = node.arg.value
    else:
        return None
    return None if hasattr(dict, key) else key


def _nodes_of(node: nodes.Node) -> list[nodes.Node]:
    """``node`` and every node inside it."""
    from jinja2 import nodes

    return [node, *node.find_all(nodes.Node)]


def _is_tojson(node: nodes.Node) -> bool:
    """Whether ``node`` is ``x | tojson``, without arguments."""
    from jinja2 import nodes

    return (isinstance(node, nodes.Filter) and node.name == "tojson" and node.node is not None
            and not node.args and not node.kwargs and node.dyn_args is None
            and node.dyn_kwargs is None)


def _split(env: ImmutableSandboxedEnvironment, source: str, name: str | None,
           filename: str | None, volatile: frozenset[str],
           stable: frozenset[str] = frozenset(), *, config: bool = False,
           tojson: object = None, texts: dict[str, str] | None = None,
           truthy: frozenset[str] = frozenset()) -> _Split | None:
    """The split form of ``source`` (see :class:`_Split`), or None where it cannot be.
    ``config``: a YAML config's (its skeletons get their checks, :func:`_yaml_checks`);
    ``tojson``: the renderer's own filter (_checker's proof holds for its texts).
    ``truthy``: ``name.key`` values whose tests of truth alone (an ``{% if %}``'s or
    ``{% elif %}``'s whole test, or ``not`` of it) are taken out first: a proof only
    (Renderer.config_join_printing), its form is not to render with."""
    from jinja2 import meta, nodes

    if env.finalize is not None or env.autoescape is not False:
        return None  # outputs would not be str() of their values
    tree = env.parse(source, name, filename)
    if truthy:
        for test in tree.find_all(nodes.If):
            inner = test.test.node if isinstance(test.test, nodes.Not) else test.test
            if (isinstance(inner, nodes.Getattr | nodes.Getitem)
                    and isinstance(inner.node, nodes.Name) and inner.node.ctx == "load"
                    and f"{inner.node.name}.{_dict_key(inner)}" in truthy):
                test.test = nodes.Const(True, lineno=test.lineno)
    if any(type(n).__name__ in _OPAQUE for n in tree.find_all(nodes.Node)):
        return None
    whole = frozenset(v for v in volatile if "." not in v)
    # Dicts some keys of which are per machine: name -> those keys.
    partial: dict[str, set[str]] = {}
    for entry in volatile:
        head, _, key = entry.partition(".")
        if key and head not in whole:
            partial.setdefault(head, set()).add(key)
    every = list(tree.find_all(nodes.Name))
    bound = {n.name for n in every if n.ctx != "load"} | _SPECIAL
    if (not bound.isdisjoint(whole) or not bound.isdisjoint(partial)
            or any(n.name.startswith("_nb_") for n in every)):
        return None

    def keyed(tree: nodes.Node) -> dict[int, str]:
        """id() of each load of a name that is a look-up of one key of it (_dict_key) -> that
        key."""
        reads = {}
        for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
            assert isinstance(node, nodes.Getattr | nodes.Getitem)
            inner = node.node
            if isinstance(inner, nodes.Name) and inner.ctx == "load":
                key = _dict_key(node)
                if key is not None:
                    reads[id(inner)] = key
        return reads

    def hot(node: nodes.Node, reads: dict[int, str]) -> bool:
        """Whether ``node`` reads a per-machine value (a partial dict otherwise than by one
        of its other keys, ``reads``, counts as whole)."""
        return any(isinstance(n, nodes.Name) and n.ctx == "load" and (
            n.name in whole or (n.name in partial and (
                id(n) not in reads or reads[id(n)] in partial[n.name])))
            for n in _nodes_of(node))

    def loads(node: nodes.Node) -> set[str]:
        return {n.name for n in _nodes_of(node) if isinstance(n, nodes.Name)}

    reads = keyed(tree)
    filler = _Filler(env, tojson, texts)
    loops: list[tuple[bool, ...]] = []
    for loop in list(tree.find_all(nodes.For)):
        if not hot(loop.iter, reads):
            continue
        target = loop.target
        body = [n for b in loop.body for n in _nodes_of(b)]
        if (loop.test is not None or loop.recursive or loop.else_
                or not isinstance(target, nodes.Name) or loads(loop.iter) & bound
                or any(isinstance(n, nodes.For) for n in body)):
            return None
        printed: list[tuple[nodes.Output, int, bool]] = []
        taken = set()
        for output in body:
            if not isinstance(output, nodes.Output):
                continue
            for i, child in enumerate(output.nodes):
                json = _is_tojson(child)
                item = child.node if isinstance(child, nodes.Filter) and json else child
                if (isinstance(item, nodes.Name) and item.name == target.name
                        and item.ctx == "load" and (filler.tojson is not None or not json)):
                    taken.add(id(item))
                    printed.append((output, i, json))
        if any(isinstance(n, nodes.Name) and n.name in (target.name, "loop")
               and id(n) not in taken for n in body):
            return None  # the item (or the loop) used otherwise than printed so
        outs = tuple(json for _, _, json in printed)
        if not filler.loop(loop.iter, outs):
            return None
        for k, (output, i, _) in enumerate(printed):
            output.nodes[i] = nodes.Getitem(nodes.Name(target.name, "load"), nodes.Const(k),
                                            "load", lineno=output.nodes[i].lineno)
        loop.iter = nodes.Name(f"_nb_loop_{len(loops)}", "load", lineno=loop.iter.lineno)
        loops.append(outs)
    json_slots: list[bool] = []
    for output in tree.find_all(nodes.Output):
        for i, child in enumerate(output.nodes):
            if not hot(child, reads):
                continue
            if loads(child) & bound or not filler.output(child):
                return None
            output.nodes[i] = nodes.Name(f"_nb_slot_{len(json_slots)}", "load",
                                         lineno=child.lineno)
            json_slots.append(_is_tojson(child))
    if not json_slots and not loops:
        return None  # nothing to fill in: rendered whole, as before
    reads = keyed(tree)
    if hot(tree, reads):
        return None  # a per-machine value used otherwise than printed
    # The names the template reads of its context (Jinja's own account; a global's name too:
    # a context's value of it comes first).
    names = [n for n in tree.find_all(nodes.Name) if n.ctx == "load"]
    read = {n for n in meta.find_undeclared_variables(tree) | {
        n.name for n in names if n.name in env.globals} if not n.startswith("_nb_")}
    # Those read key by key alone (a partial dict's other keys; a plan's reason), but for a
    # stable one (its serial keys it: Renderer.freeze) or a global's name: the values of
    # those keys key the skeleton, not the whole dict's (which marshal wrote object by
    # object: ~300 instructions each).
    parts = tuple(sorted(head for head in read if head in partial or (
        head not in stable and head not in env.globals
        and all(id(n) in reads for n in names if n.name == head))))
    fixed = tuple(sorted(read.difference(parts)))
    for head in fixed:
        filler.fixed(head, head in stable)
    for head in parts:
        filler.part(head, tuple(sorted({reads[id(n)] for n in names if n.name == head})))
    code = env.compile(tree, name, filename)
    template = env.template_class.from_code(env, code, env.make_globals(None))
    return _Split(template, fixed + parts, filler.compiled(), tuple(json_slots),
                  loops=tuple(loops), config=config,
                  proven=tojson is not None and filler.tojson is tojson,
                  spliced=tuple(filler.spliced))


def _unsure() -> None:
    raise _Unsure


class _Missing:
    """A name or key not there, in a split's key (_Filler): equal to itself alone."""

    __slots__ = ()


class _Filler:
    """The source of one function that gives a split template's filled values from a
    context (:class:`_Split`): ``str()`` of each output's expression, as Jinja's generated
    code evaluates it (names, ``.attr``, ``[constant]``, ``or``, ``and``, ``~``, constants,
    ``| tojson``), then of each item of each loop; and the key of its skeleton: each other
    name's value (the values of the keys read of a dict read key by key), then the length of
    each loop's list. Compiled once per split, as Jinja compiles a template: a closure per
    look-up cost a Python call each, ~1,000 instructions (six for a config's hostname). An
    undefined value, a missing name or key, anything raised: the whole render answers (and
    says why).

    A key's value is a str, an int or None as it is (a str never equals another type's
    value, an int only another int of this place: a bool is not an int here), a name or key
    not there as ``M`` (that sentinel alone), a frozen value (Renderer.freeze) as
    ``(None, its serial)``, any other as ``(marshal's bytes,)``: marshal takes only the
    built-in types (a str subclass, an enum, any object is refused, ValueError) and reads
    back what it wrote, so equal bytes are equal values of equal types (version 2 writes no
    back-references). So equal keys are equal values of equal types, and a str or int is
    hashed and compared in place (marshal wrote a config's dozen values at ~350
    instructions each: a tenth of a split config).

    The source holds no text of the template: every name, key and constant is a value in the
    function's namespace (``k0``, ``k1``...)."""

    def __init__(self, env: ImmutableSandboxedEnvironment, own: object = None,
                 texts: dict[str, str] | None = None) -> None:
        from jinja2.sandbox import SandboxedEnvironment

        self.env = env
        tojson = env.filters.get("tojson")
        # A filter given the context or environment is not called as Jinja calls it here.
        self.tojson = None if tojson is None or hasattr(tojson, "jinja_pass_arg") else tojson
        # ``own``: the renderer's tojson, whose text of a Spliced is known (_splice_form):
        # such an output's values may go into places of the skeleton (spliced).
        self._own = own is not None and self.tojson is own
        # ``texts``: the renderer's tojson's texts of strs (_tojson's ``short``), read in place
        # where it has one: what it returns for such a str, without its call (a config's
        # k3s arguments, three or more a config: ~1,400 instructions each, session 32).
        self._texts = texts if self._own else None
        self.spliced: list[int] = []  # the outputs that may be so: ``name | tojson``
        self._splices: list[str] = []  # each one's Splice, or None: in the skeleton's key
        # A dict's item looked up in place where the environment's look-up would find it
        # first (_sandbox's getattr for a name no dict attribute has; the sandbox's getitem
        # for any key), else through the environment's method.
        self._items = getattr(type(env), "items_by_name", False) is True
        self._getitem = type(env).getitem is SandboxedEnvironment.getitem
        self._consts: dict[str, Any] = {}
        self._outputs: list[str] = []
        self._body: list[str] = []
        self._keys: list[str] = []
        self._lengths: list[str] = []
        self._ascii: list[str] = []  # each value printed through tojson is a str of ASCII

    def output(self, node: nodes.Node) -> bool:
        """``{{ node }}`` filled in; False where its expression is not one followed here."""
        from jinja2 import nodes

        source = self._expression(node)
        if source is None:
            return False
        if _is_tojson(node) and self.tojson is not None:
            assert source.startswith("j(") and source.endswith(")")  # _expression's
            at = len(self._outputs)
            value = f"w{at}"
            self._ascii.append(f"isinstance({value}, str) and ia({value})")
            assert isinstance(node, nodes.Filter)  # _is_tojson's
            if self._own and isinstance(node.node, nodes.Name):
                # A register command (a Spliced of plain values): its values, each in its
                # place of the skeleton, which holds tojson's text of its fixed texts
                # (_Split._skeleton); not its whole text written again (session 31).
                self.spliced.append(at)
                self._splices.append(f"q{at}")
                self._outputs.append(
                    f"*({value}.values if (q{at} := ({value}.splice if type({value} := "
                    f"{source[2:-1]}) is Sp and {value}.plain else None)) is not None "
                    f"else (str({self._json(value, value)}),))")
                return True
            source = self._json(f"({value} := {source[2:-1]})", value)
        self._outputs.append(f"str({source})")
        return True

    def loop(self, seq: nodes.Node, outs: tuple[bool, ...]) -> bool:
        """A loop over ``seq`` whose body prints its item ``outs`` times (each through tojson
        or not): each item's texts filled in, in order; its list's length keys the
        skeleton. False where ``seq`` is not an expression followed here."""
        source = self._expression(seq)
        if source is None:
            return False
        at = len(self._lengths)
        self._body += [f"s{at} = {source}",
                       f"if type(s{at}) is not list and type(s{at}) is not tuple:",
                       "    unsure()  # iterated as it is by the whole render alone",
                       f"for i in s{at}:"]
        self._body += [f"    out.append(str({self._json('i', 'i') if json else 'i'}))"
                       for json in outs]
        if any(outs):
            self._body.append("    a = a and isinstance(i, str) and ia(i)")
        self._lengths.append(f"len(s{at})")
        return True

    def fixed(self, name: str, stable: bool) -> None:
        """Name ``name``'s value keys the skeleton (``stable``: by its serial where frozen)."""
        self._keys.append(self._key(f"c.get({self._const(name)}, M)", stable))

    def part(self, name: str, keys: tuple[str, ...]) -> None:
        """Dict ``name`` read by ``keys`` alone: their values key the skeleton, as the
        sandbox's look-up of a dict's key finds them."""
        d = f"p{len(self._body)}"
        self._body += [f"{d} = c[{self._const(name)}]",
                       f"if type({d}) is not dict:",
                       "    unsure()  # an attribute look-up: not followed here"]
        self._keys += [self._key(f"{d}.get({self._const(k)}, M)", False) for k in keys]

    def compiled(self) -> Callable[[Mapping[str, Any], dict[int, int]],
                                   tuple[list[str], tuple[Any, ...], bool]]:
        """``fill(context, frozen) -> (filled values, the skeleton's key, ascii)``: ``ascii``,
        whether every value printed through tojson was a str of ASCII alone (_checker)."""
        import jinja2

        source = "\n".join([
            "def fill(c, fr):",
            *(f"    {line}" for line in [
                "out = [" + ", ".join(self._outputs) + "]",
                "a = " + " and ".join(["True", *self._ascii]), *self._body,
                "return out, (" + "".join(f"{k}, " for k in [*self._keys, *self._splices,
                                                             *self._lengths])
                + "), a"])])
        namespace: dict[str, Any] = {
            "U": jinja2.Undefined, "unsure": _unsure, "ga": self.env.getattr,
            "gi": self.env.getitem, "j": self.tojson, "jt": self._texts, "M": _Missing(),
            "mu": marshal.dumps,
            "ia": str.isascii, "Sp": Spliced, **self._consts}
        exec(compile(source, "<netboot split>", "exec"), namespace)  # noqa: S102
        fill: Callable[[Mapping[str, Any], dict[int, int]],
                       tuple[list[str], tuple[Any, ...], bool]] = namespace["fill"]
        return fill

    def _json(self, source: str, value: str) -> str:
        """The tojson text of ``source``'s value (named ``value`` once evaluated): the one
        its texts hold for a str, else its call's."""
        if self._texts is None:
            return f"j({source})"
        return (f"(_h if type({source}) is str and (_h := jt.get({value})) is not None"
                f" else j({value}))")

    @staticmethod
    def _key(source: str, stable: bool) -> str:
        """The key's value of ``source``'s (see the class)."""
        frozen = "(None, _s) if (_s := fr.get(id(_v))) is not None else " if stable else ""
        return (f"(_v if (_y := type(_v := {source})) is str or _y is int or _v is None"
                f" or _v is M else {frozen}(mu(_v, 2),))")

    def _const(self, value: object) -> str:
        name = f"k{len(self._consts)}"
        self._consts[name] = value
        return name

    def _expression(self, node: nodes.Node) -> str | None:
        """``node``'s source; None for an expression not followed here."""
        from jinja2 import nodes

        if isinstance(node, nodes.Name):
            return _known(f"c[{self._const(node.name)}]")
        if isinstance(node, nodes.Const):
            return self._const(node.value)
        if isinstance(node, nodes.Getattr):
            of, attr = self._expression(node.node), self._const(node.attr)
            if of is None:
                return None
            if self._items and not hasattr(dict, node.attr):
                return _known(f"(_t[{attr}] if type(_t := {of}) is dict else ga(_t, {attr}))")
            return _known(f"ga({of}, {attr})")
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            of, item = self._expression(node.node), self._const(node.arg.value)
            if of is None:
                return None
            if self._getitem:
                return _known(f"(_t[{item}] if type(_t := {of}) is dict else gi(_t, {item}))")
            return _known(f"gi({of}, {item})")
        if isinstance(node, nodes.Or | nodes.And):
            left, right = self._expression(node.left), self._expression(node.right)
            if left is None or right is None:
                return None
            return f"({left} {'or' if isinstance(node, nodes.Or) else 'and'} {right})"
        if isinstance(node, nodes.Concat):
            # ``a ~ b``: Jinja's str_join (autoescape off: _split's premise), "".join of str()s.
            pieces = [self._expression(n) for n in node.nodes]
            if any(p is None for p in pieces):
                return None
            return '"".join([' + "".join(f"str({p}), " for p in pieces) + "])"
        if _is_tojson(node) and self.tojson is not None:
            assert isinstance(node, nodes.Filter) and node.node is not None  # _is_tojson's
            of = self._expression(node.node)
            return None if of is None else f"j({of})"
        return None


def _known(source: str) -> str:
    """``source``'s value, where it is not undefined (else _Unsure: the whole render says
    what is wrong). ``_t`` is taken as soon as it is set: an inner one is done by then."""
    return f"(_t if not isinstance(_t := {source}, U) else unsure())"


# Where a YAML problem's text starts quoting the document ('…', "…"; %r of a name), and
# the quotes of PyYAML's own words that it keeps ("could not find expected ':'", "expected
# ',' or '}'", "but found '<scalar>'": an indicator, a token's kind).
_PROBLEM_QUOTE = re.compile("['\"]")
_OWN_QUOTE = re.compile(r"'(?:[:,\-\[\]{}?]|<[a-z ]+>)'")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What a rendered config's YAML error says, by line and column, without the text of
    its line: PyYAML's pure-Python parser (where it is built without libyaml) prints the line
    it failed at, of the rendered config, which holds the machine's install token and its
    cluster's join token, and the error is a ``render failed`` event that a read token and
    the event stream are shown (libyaml's marks carry no text). Nor what a problem quotes of
    the document (a tag's, an alias's, an anchor's name: "could not determine a constructor
    for the tag '!Hunter2'", a password printed without tojson): cut at its first quote, the
    line and column say where (s44-attack)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    said = []
    for quoting, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark)):
        what = _unquoted(quoting) if quoting else quoting
        if what or mark is not None:
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            said.append(f"{what or 'here'}{at}")
    return "; ".join(said) or type(exc).__name__


def _unquoted(problem: str) -> str:
    """``problem`` up to its first quote that is not one of PyYAML's own words."""
    cut = _PROBLEM_QUOTE.search(_OWN_QUOTE.sub(lambda m: "_" * len(m.group()), problem))
    return problem if cut is None else problem[:cut.start()].rstrip(" :;,")


def _failed_at(exc: Exception, name: str | None) -> str:
    """Where and how a template's render failed with a plain Python error (an IndexError
    of ``"{0}".format_map(...)``, a ZeroDivisionError, a TypeError): ``, line N: kind:
    message``, the line of the innermost template frame (Jinja rewrites a render's traceback
    into frames of the template's lines, named "template", "top-level template code" or
    "block '...'": jinja2.debug.fake_traceback), another file's name where an included
    template's line failed (``name``: the template rendered). Such an error was let out as
    it was: a 500 and a traceback for an operator's template text (benchmarks/README.md,
    s37-attack, s37-polish)."""
    return f"{_line_at(exc, name)}: {type(exc).__name__}: {exc}"


def _line_at(exc: Exception, name: str | None) -> str:
    """``, line N`` (``of FILE`` for an included template's) of :func:`_failed_at`, "" where
    no template frame is in the traceback."""
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in ("template", "top-level template code") or (
                code.co_name.startswith("block '")):
            where = f", line {tb.tb_lineno}"
            file = os.path.basename(code.co_filename)
            if code.co_filename not in ("<template>", "<unknown>") and (
                    name is None or file != os.path.basename(name)):
                where += f" of {file}"
        tb = tb.tb_next
    return where


def _render(template: jinja2.Template, context: Mapping[str, Any]) -> str:
    """``template.render(**context)``: the same text and errors, the same Context (its
    parent: the template's globals under the context; its globals' names), made with C-level
    dict merges. Jinja copied the context three times and its globals (a ChainMap of the
    template's own over the environment's) twice through ChainMap's Python methods: a tenth
    of a config's render."""
    env = template.environment
    globals_ = template.globals
    if type(globals_) is ChainMap:
        flat: dict[str, Any] = {}
        for layer in reversed(globals_.maps):  # the first map wins, as in a lookup
            flat.update(layer)
    else:
        flat = dict(globals_)
    try:
        return env.concat(template.root_render_func(env.context_class(
            env, {**flat, **context}, template.name, template.blocks, globals=flat)))
    except Exception:
        env.handle_exception()


def _sandbox() -> type[ImmutableSandboxedEnvironment]:
    """Jinja's immutable sandbox, with ``dict.key`` looked up without raising: the sandbox
    asks ``getattr(obj, key)`` first and, on its AttributeError (~1 µs to raise and catch),
    ``obj[key]``; a template's context is dicts (a config reads a dozen such values). For an
    exact dict and a name no dict attribute has, that getattr cannot but fail (a dict has
    no instance attributes), so the item is looked up at once: the same value, or the same
    undefined. Everything else (attributes that exist, other types) goes through the
    sandbox's own checks, unchanged."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    dict_names = frozenset(dir(dict))
    sandbox_getattr = ImmutableSandboxedEnvironment.getattr

    def getattr(self: ImmutableSandboxedEnvironment, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in dict_names:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return sandbox_getattr(self, obj, attribute)

    # Made with type(), not a class statement: mypyc (NETBOOT_MYPYC=1 builds this module)
    # compiles no class defined inside a function.
    # ``items_by_name``: its getattr of an exact dict and a name no dict attribute has is
    # that item (_Filler looks such items up in place).
    sandbox: type[ImmutableSandboxedEnvironment] = type(
        "Sandbox", (ImmutableSandboxedEnvironment,), {"getattr": getattr,
                                                      "items_by_name": True})
    return sandbox


# Jinja's tojson writes ``json.dumps(value, sort_keys=True)`` (its default policy), which
# makes a JSONEncoder per value (~4.5 µs); a config prints every value through it. The same
# text from one encoder (~0.3 µs); other arguments (``tojson(indent=2)``) as before.
_SORTED_JSON = json.JSONEncoder(sort_keys=True)
# tojson's text of a str this long is kept (a CA's PEM, the same in every config), this many.
_TOJSON_KEPT_FROM = 1024
_TOJSON_KEPT = 16
# tojson's texts of shorter strs kept (a cluster's server URL, join token and k3s arguments,
# the same in each of its configs; a machine's own values come and go): at most this many.
_TOJSON_SHORT_KEPT = 256


class Splice:
    """Fixed texts with per-value texts to go between them (``fixed[0] + values[0] + fixed[1]
    + ...``): a config's register command, ~600 characters around a machine's MAC, token and
    node name, made once per base URL. Its texts (:meth:`of`) are :class:`Spliced`, whose
    ``tojson`` writes the fixed texts' escapes once per Splice and escapes only the values."""

    __slots__ = ("fixed", "slots")

    def __init__(self, fixed: tuple[str, ...]) -> None:
        self.fixed = fixed
        self.slots = _slots(fixed)

    def of(self, values: tuple[str, ...], *, plain: bool = False) -> Spliced:
        """The text with ``values``; ``plain``: the caller found them :func:`plain` (tojson
        then writes them as they are without looking again)."""
        if len(values) != len(self.fixed) - 1:
            raise ValueError("a Splice's text has one value fewer than fixed texts")
        pieces = self.slots.copy()  # _filled, without its call: once per config fetched
        pieces[1::2] = values
        text = Spliced("".join(pieces))
        text.splice = self
        text.values = values
        text.plain = plain
        return text


def plain(values: Sequence[str]) -> bool:
    """Whether every one of ``values`` is printable ASCII without JSON's ``"`` and ``\\``,
    HTML's ``<``, ``>``, ``&`` and the shell's ``'`` (``_HTML_PLAIN``): a MAC, a token, a
    node name as a rule. JSON's escape of such a str (``encode_basestring_ascii``) is the
    str between quotes, HTML's replacements (tojson) and a single quote's closing (the
    register command) change nothing in it."""
    return _HTML_PLAIN.fullmatch("".join(values)) is not None


def _slots(fixed: Sequence[str]) -> list[str]:
    """``fixed`` with a place between each two for a value (:func:`_filled`)."""
    slots = [""] * (2 * len(fixed) - 1)
    slots[::2] = fixed
    return slots


def _filled(slots: list[str], values: Sequence[str]) -> str:
    """The text of :func:`_slots` with ``values`` in its places: a copy, a slice assignment
    and a join (callgrind: ~3,200 instructions for a register command, where a %-format of
    it parsed its ~640 characters again, ~7,100)."""
    pieces = slots.copy()
    pieces[1::2] = values
    return "".join(pieces)


# A subclass of str: mypyc makes no native class of one (setup.py's compiled build keeps it a
# Python class, its methods compiled).
@mypyc_attr(native_class=False)
class Spliced(str):
    """A :class:`Splice`'s text with its values: printed, compared, sliced, it is that str;
    ``tojson`` writes it from the Splice's fixed texts' escapes, kept, and the values': the
    same text, as JSON's escapes and HTML's replacements are made character by character
    (the whole register command's were ~40,000 instructions of a first config's ~565,000)."""

    __slots__ = ("plain", "splice", "values")

    splice: Splice
    values: tuple[str, ...]
    plain: bool  # the values are plain() (Splice.of)


# What tojson writes as it is (between its quotes): printable ASCII but for JSON's '"' and
# '\\' and HTML's '<', '>', '&' and "'" (a MAC, a token, a node name).
_HTML_PLAIN = re.compile(r"[\x20\x21\x23-\x25\x28-\x3b\x3d\x3f-\x5b\x5d-\x7e]*")


def _tojson(texts: dict[str, str] | None = None) -> Callable[..., str]:
    """Jinja's ``tojson`` filter (``htmlsafe_json_dumps``: the same text, HTML's special
    characters written as JSON escapes, as ``Markup``), without its per-use policy lookups
    and keyword copies (a config prints a dozen values through it)."""
    from json.encoder import encode_basestring_ascii

    from markupsafe import Markup

    new = str.__new__
    # Strings' texts by value: long ones (a config's CA, ~5 µs to write each time), a few;
    # shorter ones (~0.3 µs each; a config prints several a cluster's configs share), more.
    kept: dict[str, str] = {}
    # ``texts``: the renderer's (its split fills read it), or its own.
    short: dict[str, str] = {} if texts is None else texts
    forms: dict[Splice, list[str]] = {}  # a Splice's texts' (a register command's, per base URL)

    def tojson(value: Any, indent: int | None = None) -> str:
        into = None
        if indent is not None:
            text = json.dumps(value, sort_keys=True, indent=indent)
        elif type(value) is str:  # what the encoder does with one, without its checks
            into = kept if len(value) >= _TOJSON_KEPT_FROM else short
            made = into.get(value)
            if made is not None:
                return made
            # A machine's own value (its hostname, its node name: a miss, each config):
            # plain(), its text is itself quoted, as the encoder and _html_safe write it.
            if _HTML_PLAIN.fullmatch(value) is not None:
                made = new(Markup, f'"{value}"')
                _keep(into, value, made, _TOJSON_KEPT if into is kept else _TOJSON_SHORT_KEPT)
                return made
            text = encode_basestring_ascii(value)
        elif type(value) is Spliced:
            splice = value.splice
            form = forms.get(splice)
            if form is None:  # the fixed texts' escapes, with places for the values'
                form = _splice_form(splice)
                _keep(forms, splice, form, _TOJSON_KEPT)
            values = value.values
            if not value.plain and not plain(values):  # a value to escape
                values = tuple(_html_safe(encode_basestring_ascii(v))[1:-1] for v in values)
            return new(Markup, _filled(form, values))
        else:
            text = _SORTED_JSON.encode(value)
        made = new(Markup, _html_safe(text))
        if into is not None:
            _keep(into, value, made, _TOJSON_KEPT if into is kept else _TOJSON_SHORT_KEPT)
        return made

    return tojson


def _splice_form(splice: Splice) -> list[str]:
    """tojson's text of ``splice``'s texts (:class:`Spliced`) as :func:`_slots`: its fixed
    texts' escapes, the first after the opening quote, the last before the closing one, with
    a place for each value's (a plain value's is itself)."""
    from json.encoder import encode_basestring_ascii

    fixed = [_html_safe(encode_basestring_ascii(f))[1:-1] for f in splice.fixed]
    fixed[0], fixed[-1] = '"' + fixed[0], fixed[-1] + '"'
    return _slots(fixed)


def _html_safe(text: str) -> str:
    """JSON text with HTML's special characters written as JSON escapes, as Jinja's tojson
    writes them: safe as Jinja's own (each is replaced alone, and no replacement holds one)."""
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("'", "\\u0027"))


def grub_quote(text: str) -> str:
    """One GRUB script word: single-quoted, so that ``$``, ``;``, ``&`` and spaces in a token
    or URL stay literal (GRUB expands nothing inside single quotes, like sh); ``'`` itself is
    closed, escaped and reopened. A newline would end the command: refused."""
    if "\n" in text or "\r" in text:
        raise RenderError("a GRUB word cannot contain a line break")
    return "'" + text.replace("'", "'\\''") + "'"


# iPXE has no quoting: a line is split into tokens at whitespace (src/core/exec.c,
# split_command), a token that is exactly "&&", "||" or ";" ends the command and starts
# another (command_terminator), one starting with "#" begins a comment, and "${name}" in a
# token is replaced by a setting after the split (src/core/settings.c, expand_settings). A
# value written into a command can be made inert only by changing those characters: they
# are percent-encoded, as iPXE's own ``${serial:uristring}`` writes a value. And a script line
# that ends in a backslash is continued by the next (src/image/script.c, process_script): a
# value last on its line that ends in one took the next line in as its words (an imgverify,
# an initrd, the hold's sleep: s38-attack), so ipxe_arg encodes every backslash (uristring
# does) and ipxe_text the one a value ends with.
_IPXE_ARG = re.compile(r"[\x00-\x20\x7f%$&|;#\\]")
_IPXE_TEXT = re.compile(r"[\x00-\x1f\x7f]|\$(?=\{)|(?<!\S)(?:&&|\|\||;)(?!\S)|(?<!\S)#"
                        r"|\\\Z")


def _percent(match: re.Match[str]) -> str:
    char = match.group()[0]
    return f"%{ord(char):02X}{match.group()[1:]}"


def ipxe_arg(value: object) -> str:
    """``value`` as (part of) one iPXE argument: whitespace, control characters, ``%``,
    ``$``, ``&``, ``|``, ``;``, ``#`` and ``\\`` percent-encoded, so that it neither splits into
    more arguments (a kernel parameter of its own) nor ends the command (``&& chain
    http://…``), starts a comment or expands a setting."""
    return _IPXE_ARG.sub(_percent, str(value))


def ipxe_text(value: object) -> str:
    """``value`` as words of an iPXE ``echo`` (or ``#`` comment) line, its spaces kept: a
    word that is ``&&``, ``||`` or ``;`` or starts with ``#``, ``${``, control
    characters (a line break would start a command) and a backslash that ends the value (it
    would continue the line) have their first character percent-encoded; any other text is
    left as it is."""
    return _IPXE_TEXT.sub(_percent, str(value))


def grub_args(cmdline: str) -> str:
    """A kernel command line as GRUB ``linux`` arguments, each word quoted (GRUB joins them
    with single spaces into the command line it hands the kernel)."""
    return " ".join(grub_quote(word) for word in cmdline.split())
