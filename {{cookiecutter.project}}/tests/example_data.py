"""Small data the tests make for the example tasks (nothing is downloaded)."""

import random


def images(folder, classes=("circle", "square", "stripe"), per_class=60, size=40, seed=0):
    """An ImageFolder of `per_class` noisy images per class: folder/<class>/<n>.png."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            box = [rng.randrange(size // 4), rng.randrange(size // 4), size - 4, size - 4]
            colour = tuple(rng.randrange(256) for _ in range(3))
            if label == 0:
                draw.ellipse(box, fill=colour)
            elif label == 1:
                draw.rectangle(box, fill=colour)
            else:
                for x in range(0, size, 6):
                    draw.line([x, 0, x, size], fill=colour, width=2)
            image.save(folder / name / f"{n}.png")
    return folder


def text(path, characters=12000, seed=0):
    """A text of made-up words with some structure to learn."""
    rng = random.Random(seed)
    letters = "etaoinshrdlu"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 7))) for _ in range(40)]
    lines = []
    while sum(map(len, lines)) < characters:
        line = " ".join(rng.choices(words, k=rng.randint(4, 10)))
        lines.append(line.capitalize() + ".")
    path.write_text("\n".join(lines) + "\n")
    return path
