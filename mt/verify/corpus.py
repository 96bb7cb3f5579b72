"""Built-in multilingual text for tokenizer and logit checks (the ten tada-3b-ml languages and more)."""

CORPUS: dict[str, str] = {
    "en": "The quick brown fox jumps over the lazy dog. It's 9:45 a.m. — isn't it?",
    "ja": "素早い茶色の狐がのろまな犬を飛び越える。東京は2026年11月27日、晴れです。",
    "de": "Der schnelle braune Fuchs springt über den faulen Hund. Größe, Übermaß, Straße!",
    "fr": "Le renard brun rapide saute par-dessus le chien paresseux. Où est l'hôtel ? Ça va.",
    "es": "El veloz murciélago hindú comía feliz cardillo y kiwi. ¿Dónde está el niño? ¡Olé!",
    "zh": "敏捷的棕色狐狸跳过了懒狗。我想在苹果公司工作1314151天～",
    "ar": "الثعلب البني السريع يقفز فوق الكلب الكسول. مرحبا بالعالم ١٢٣",
    "it": "La volpe marrone veloce salta sopra il cane pigro. Perché è così? Caffè.",
    "pl": "Zażółć gęślą jaźń. Szybki brązowy lis przeskakuje nad leniwym psem.",
    "pt": "A raposa marrom rápida salta sobre o cão preguiçoso. Ação, coração, não é?",
    "digits": "3 33 333 3333 33333 3.14159 1,000,000 0x7f80 2026-11-27 +49 (0)30 1234567",
    "emoji": "🚀 🦙🦙 😶‍🌫️ ✅ 👩‍👩‍👧‍👦 🇩🇪 ❤️‍🔥",
    "whitespace": "tabs\tand\t\ttabs\n\nnew lines\n   three spaces    four\r\nend  ",
    "code": "def f(x):\n    return x ** 2  # square\n\nif __name__ == '__main__':\n\tprint(f(3))",
}


def with_special_tokens(bos: str | None, eos: str | None) -> str:
    """Text that embeds the tokenizer's own special tokens, as chat-formatted data does."""
    parts = [p for p in (bos, "Hello", eos, " world ", bos) if p]
    return "".join(parts)
