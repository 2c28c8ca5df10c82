"""Routing the reference's class-level patcher calls to the framework that is running.

Reference plugins call `ModelPatcher.register(rule)` or `AcceleratorPatcher.replace(...)` on the
class. Here each framework owns its patchers, and while it runs a plugin hook it makes them
current in a context variable; a class-level call reaches the current one. So two frameworks in
one process never share rules, history or patches.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

from .errors import PatchError

T = TypeVar("T")


class Routable:
    """Mixin: a class whose instances can be made current for class-level calls."""

    _current: ContextVar

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_current" not in cls.__dict__:
            cls._current = ContextVar(f"current_{cls.__name__}", default=None)

    @classmethod
    def current(cls) -> Any:
        """The instance current in this context, or None."""
        return cls._current.get()

    @classmethod
    def require_current(cls, call: str) -> Any:
        current = cls._current.get()
        if current is None:
            raise PatchError(
                f"{cls.__name__}.{call} was called on the class outside a running framework: "
                "call it from a plugin hook (model_loader, augmentation, "
                "get_callbacks_and_ready_for_train), inside "
                f"fms_acceleration.utils.test_utils.instantiate_{_snake(cls.__name__)}(), or on "
                "a patcher instance"
            )
        return current

    @contextmanager
    def activated(self) -> Iterator[Any]:
        """Make this instance the target of class-level calls within the block."""
        token = type(self)._current.set(self)
        try:
            yield self
        finally:
            type(self)._current.reset(token)


def _snake(name: str) -> str:
    return {"ModelPatcher": "model_patcher", "AcceleratorPatcher": "accel_patcher"}.get(
        name, name.lower()
    )


class routed_method(Generic[T]):
    """On an instance: a normal method. On the class: the method of the current instance."""

    def __init__(self, func: Callable[..., T]) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type[Routable]) -> Callable[..., T]:
        target = obj if obj is not None else owner.require_current(f"{self.name}()")
        return types.MethodType(self.func, target)


class routed_reader(Generic[T]):
    """Like routed_method, but on the class with no current instance it reads a fresh, empty
    instance: reading history or a summary outside a running framework shows nothing."""

    def __init__(self, func: Callable[..., T]) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: Any, owner: type[Routable]) -> Callable[..., T]:
        target = obj if obj is not None else (owner.current() or owner())
        return types.MethodType(self.func, target)


class routed_attribute:
    """A public attribute backed by a private one; read on the class, it is the current
    instance's (empty when none). Internals always use the private name."""

    def __init__(self, private: str) -> None:
        self.private = private

    def __get__(self, obj: Any, owner: type[Routable]) -> Any:
        target = obj if obj is not None else (owner.current() or owner())
        return getattr(target, self.private)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj, self.private, value)
