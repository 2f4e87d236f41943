"""What the pipeline knows about the dataset beyond its files: how many classes, their names, its title."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.idx import NUM_CLASSES

MNIST_TITLE = "MNIST digits"
OTHER_TITLE = "dataset"


class DatasetConfig(BaseModel):
    """The classes of the dataset and what to call them; labels are 0..num_classes-1."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, description=f"title of the dataset in the report and the UI (default: {MNIST_TITLE!r} for MNIST, else {OTHER_TITLE!r})"
    )
    # Labels are stored as uint8.
    num_classes: int = Field(NUM_CLASSES, ge=2, le=256, description="number of classes; labels must be 0..num_classes-1")
    class_names: list[str] | None = Field(
        None, description="names of the classes in label order, comma-separated (default: the labels themselves)"
    )

    @field_validator("class_names", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        # The command line and the environment give one comma-separated string.
        return [part.strip() for part in value.split(",")] if isinstance(value, str) else value

    @field_validator("class_names")
    @classmethod
    def _distinct(cls, names: list[str] | None) -> list[str] | None:
        if names is not None:
            if any(not name for name in names):
                raise ValueError("expected non-empty names, found an empty one")
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(f"expected distinct names, found {', '.join(map(repr, repeated))} more than once")
        return names

    @model_validator(mode="after")
    def _one_name_per_class(self) -> DatasetConfig:
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names: expected {self.num_classes} names (one per class, num_classes {self.num_classes}), "
                f"found {len(self.class_names)}"
            )
        return self

    def names(self) -> list[str]:
        """Return the name of each class in label order (the labels themselves when no names are given)."""
        return list(self.class_names) if self.class_names else [str(c) for c in range(self.num_classes)]

    def title(self, is_mnist: bool) -> str:
        """Return the dataset's title: its configured name, else MNIST's or a neutral one."""
        return self.name or (MNIST_TITLE if is_mnist else OTHER_TITLE)
