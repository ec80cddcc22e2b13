"""A small labelled corpus for the data quality filters, built offline: clean English, text in other languages
and generated junk, each document tagged with its `kind`. tests/test_quality_filters.py and
bench/quality_filters.py (the figures in docs/DATA_QUALITY.md) build it the same way.

- english: paragraphs of the Python standard library's own documentation (docstrings: modern English prose,
  present on every machine), 200+ characters each;
- other language: German, French, Spanish, Russian, Chinese and Japanese documents of 3-7 sentences drawn
  from the sentences below (everyday prose written for this corpus);
- junk: random letter strings, symbol and number soup, hex dumps, and shuffled-character "words".
"""
from __future__ import annotations

import importlib
import inspect
import random
import re
import string

STDLIB_MODULES = ("argparse", "json", "collections", "functools", "itertools", "logging", "pathlib", "shutil",
                  "subprocess", "textwrap", "unittest", "urllib.request", "email", "csv", "sqlite3", "threading",
                  "asyncio", "datetime", "decimal", "fractions", "statistics", "random", "tarfile", "zipfile",
                  "http.client", "xml.etree.ElementTree", "configparser", "difflib", "heapq", "bisect", "typing",
                  "dataclasses", "contextlib", "tempfile", "pickle", "copy", "enum", "inspect", "string", "re")

SENTENCES = {
    "de": ["Der Zug nach Hamburg hatte heute Morgen fast eine Stunde Verspätung.",
           "Meine Großmutter backt jeden Sonntag einen Apfelkuchen für die ganze Familie.",
           "Im Sommer fahren wir oft mit dem Fahrrad an den See und schwimmen dort.",
           "Die Stadtbibliothek hat ihre Öffnungszeiten am Wochenende verlängert.",
           "Nach dem langen Winter freuen sich alle auf die ersten warmen Tage.",
           "Er hat vergessen, die Fenster zu schließen, bevor das Gewitter kam.",
           "Die Kinder spielen im Garten, während die Eltern das Abendessen vorbereiten.",
           "Wir müssen noch Brot, Milch und ein paar Tomaten einkaufen.",
           "Das neue Museum zeigt Gemälde aus dem neunzehnten Jahrhundert.",
           "Kannst du mir bitte erklären, wie diese Maschine funktioniert?"],
    "fr": ["Le marché du samedi matin est toujours plein de monde et de bonnes odeurs.",
           "Nous avons passé nos vacances dans un petit village au bord de la mer.",
           "Elle apprend le piano depuis trois ans et joue déjà très bien.",
           "Le boulanger ouvre sa boutique à six heures tous les jours de la semaine.",
           "Il faut réserver une table, car ce restaurant est souvent complet.",
           "Les feuilles des arbres deviennent rouges et jaunes en automne.",
           "Mon frère travaille dans une entreprise qui fabrique des vélos électriques.",
           "Pourriez-vous m'indiquer le chemin de la gare, s'il vous plaît ?",
           "La réunion a été reportée à jeudi prochain à cause de la grève.",
           "Après le dîner, nous avons regardé un vieux film en noir et blanc."],
    "es": ["Mi vecino cultiva tomates y pimientos en el patio de su casa.",
           "El autobús llega cada quince minutos a la parada de la plaza.",
           "Durante el verano, la ciudad organiza conciertos gratuitos en el parque.",
           "Mañana tenemos que levantarnos temprano para ir al aeropuerto.",
           "La biblioteca de la universidad está abierta hasta la medianoche.",
           "Mis abuelos viven en un pueblo pequeño cerca de las montañas.",
           "¿Sabes a qué hora empieza la película esta noche?",
           "El restaurante de la esquina prepara una paella deliciosa los domingos.",
           "Los estudiantes presentaron sus proyectos al final del semestre.",
           "Hace mucho frío, así que lleva un abrigo y una bufanda."],
    "ru": ["Вчера вечером мы долго гуляли по набережной и смотрели на закат.",
           "Моя сестра работает врачом в городской больнице уже десять лет.",
           "Летом мы обычно ездим на дачу и собираем там ягоды и грибы.",
           "Поезд отправляется с третьей платформы ровно в восемь часов утра.",
           "В библиотеке можно взять книги на две недели бесплатно.",
           "Дети с радостью лепили снеговика во дворе после сильного снегопада.",
           "Не забудь купить хлеб, молоко и немного сыра по дороге домой.",
           "Новый мост через реку построили всего за два года.",
           "Учитель объяснил задачу ещё раз, и теперь всем стало понятно.",
           "Зимой в нашем городе часто бывает очень холодно и ветрено."],
    "zh": ["今天早上下了一场大雨，很多人上班都迟到了。",
           "我的奶奶每个周末都会给全家人包饺子。",
           "这家书店虽然不大，但是书的种类非常丰富。",
           "夏天的时候，我们常常去海边游泳和散步。",
           "他每天晚上都会花一个小时学习英语。",
           "新开的博物馆展出了很多古代的瓷器和字画。",
           "请问去火车站应该坐哪一路公共汽车？",
           "孩子们在公园里放风筝，玩得非常开心。",
           "这个城市的春天很短，很快就到了炎热的夏天。",
           "我们打算下个月一起去山里露营。"],
    "ja": ["今朝は雨が強く降っていたので、駅まで歩くのが大変でした。",
           "祖母は毎週日曜日に家族のために料理を作ってくれます。",
           "この図書館は週末でも夜の九時まで開いています。",
           "夏休みには友達と一緒に海へ泳ぎに行く予定です。",
           "新しいカフェのケーキはとてもおいしいと評判です。",
           "電車が遅れたので、会議に少し遅刻してしまいました。",
           "子どもたちは公園でサッカーをして楽しく遊んでいます。",
           "駅の近くに新しいスーパーマーケットができました。",
           "来月、家族で京都の古いお寺を見に行くつもりです。",
           "寒くなってきたので、暖かいコートを買いました。"],
}


def english_paragraphs(min_chars: int = 200) -> list[str]:
    """Prose paragraphs of standard-library docstrings (code examples and option tables left out)."""
    paragraphs, seen = [], set()
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        objects = [module] + [v for _, v in inspect.getmembers(module) if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            for paragraph in re.split(r"\n\s*\n", doc):
                text = " ".join(paragraph.split())
                letters = sum(ch.isalpha() or ch == " " for ch in text)
                if (len(text) >= min_chars and text not in seen and letters > 0.9 * len(text)
                        and ">>>" not in text and text.count(".") >= 2):
                    seen.add(text)
                    paragraphs.append(text)
    return paragraphs


def other_language_documents(count: int, rng: random.Random) -> list[tuple[str, str]]:
    """(language, document) pairs, languages in turn."""
    languages = sorted(SENTENCES)
    out = []
    for i in range(count):
        language = languages[i % len(languages)]
        glue = "" if language in ("zh", "ja") else " "
        out.append((language, glue.join(rng.sample(SENTENCES[language], rng.randint(3, 7)))))
    return out


def junk_documents(count: int, rng: random.Random) -> list[tuple[str, str]]:
    """(kind of junk, document) pairs, kinds in turn."""
    def random_words():
        return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10)))
                        for _ in range(rng.randint(40, 90)))

    def symbol_soup():
        alphabet = string.punctuation + string.digits + "    "
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(250, 600)))

    def hex_dump():
        return "\n".join(" ".join(f"{rng.randrange(256):02x}" for _ in range(16)) for _ in range(rng.randint(8, 20)))

    def scrambled_english():
        words = re.findall(r"[a-z]+", " ".join(SCRAMBLE_SOURCE).lower())
        picked = [rng.choice(words) for _ in range(rng.randint(40, 90))]
        return " ".join("".join(rng.sample(w, len(w))) for w in picked)

    makers = [("random_letters", random_words), ("symbols", symbol_soup), ("hex", hex_dump),
              ("scrambled", scrambled_english)]
    return [(makers[i % len(makers)][0], makers[i % len(makers)][1]()) for i in range(count)]


SCRAMBLE_SOURCE = ["The quick brown fox jumps over the lazy dog while the children watch from the window",
                   "Every morning the baker opens his shop and the smell of fresh bread fills the street"]


def build_quality_corpus(seed: int = 0, english: int = 120, other: int = 60, junk: int = 60
                         ) -> tuple[list[dict], list[str]]:
    """(records, reference_texts). Records {"text", "kind", "detail"}: kind english / other_language / junk;
    detail the language or the junk kind; shuffled with `seed`. reference_texts: the English paragraphs not in
    the corpus, to train a reference model for the perplexity filter on."""
    rng = random.Random(seed)
    paragraphs = english_paragraphs()
    rng.shuffle(paragraphs)
    reference = paragraphs[english:]
    records = [{"text": t, "kind": "english", "detail": "en"} for t in paragraphs[:english]]
    records += [{"text": t, "kind": "other_language", "detail": language}
                for language, t in other_language_documents(other, rng)]
    records += [{"text": t, "kind": "junk", "detail": what} for what, t in junk_documents(junk, rng)]
    rng.shuffle(records)
    return records, reference


def train_reference_model(texts: list[str], tokenizer, out_dir: str, steps: int = 60, seed: int = 0,
                          block: int = 128, batch: int = 8):
    """A tiny Qwen2 trained on `texts` (a plain loop: seconds on a CPU), saved with `tokenizer` to `out_dir`:
    the reference model of the perplexity filter tests."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    stream = [i for t in texts for i in tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]]
    blocks = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = blocks[torch.randint(len(blocks), (batch,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return float(loss.detach())
