"""Synthetic customer-support messages with gold intent labels for ``protege demo``.

Everything here is generated locally from hand-written templates and slot fillers
(no downloaded text), so the demo data set is reproducible from a seed alone.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import tempfile

__all__ = ["LABELS", "make_examples", "write_demo_data"]

LABELS: dict[str, str] = {
    "billing": "charges, invoices, refunds, payment methods, pricing",
    "shipping": "delivery status, tracking, lost or late or damaged packages, addresses",
    "technical": "the app or website crashes, errors, bugs, login or performance problems",
    "account": "changing email, password, profile, username, two-factor, data export",
    "cancellation": "cancel a subscription or an order, close the account, stop renewal",
}

# Core templates. ``{slot}`` is filled from _fillers(); ``[a|b|c]`` picks one
# alternative at random. A core is one or two sentences. A leading "~" marks a
# general question that should not get a complaint-style follow-up from EXTRAS.

BILLING = (
    "I was charged {amount} twice for order {order}.",
    "Why did my bill go up to {amount} this month? Nobody told me the {plan} plan price changed.",
    "I cancelled on {date} but you still charged my card {amount}. I want that refunded.",
    "Can I get an invoice for order {order}? Our accounting team needs one with the company name on it.",
    "[please|pls|Can you] update my payment method, the {card} expired",
    "Where is my refund? You said {days} business days and it's been way longer.",
    "~Do you offer a student discount on the {plan} plan?",
    "There's a {amount} charge on my [statement|credit card|bank account] from you that I don't recognise.",
    "~How much is it to upgrade from {plan} to {plan2}?",
    "My payment keeps getting declined even though the card works everywhere else.",
    "The promo code {promo} didn't apply at checkout, so I paid full price ({amount}).",
    "I was billed for the annual plan but I [picked|selected|clearly chose] monthly.",
    "~Can I pay with [PayPal|Apple Pay|a bank transfer] instead of a card?",
    "You charged me a {amount} late fee, but the payment went through on {date}.",
    "Need a refund for order {order}, I returned it {days} days ago and still nothing.",
    "I got charged sales tax on an order that should be tax exempt. Can you fix the invoice?",
    "Is there a way to switch billing to my company card? The current one is my personal {card}.",
    "The invoice says {amount} but the checkout page said {amount2}.",
    "Charged {amount} for a free trial?? It said [free|FREE|no charge] on the signup page.",
    "I'd like a receipt for the {amount} payment I made on {date}.",
    "My [husband|wife|partner|roommate] and I are both being billed for {plan}, we only need one.",
    "refund status for {order}?",
    "Why is there a pending charge of {amount} when my order hasn't even shipped?",
    "~Can I split the payment for order {order} across two cards?",
    "I was promised a partial refund of {amount2} for the damaged item and I haven't seen it.",
    "~Do your prices include VAT? The pricing page isn't clear.",
    "The auto-renewal charged me {amount} on {date}. I meant to downgrade first, can I get that back?",
    "I was charged after I cancelled. Please refund the {amount}.",
    "~What payment methods do you accept for the {plan} plan?",
    "You overcharged me on {order}: the item was on sale for {amount2} but I paid {amount}.",
)

SHIPPING = (
    "Where is my order {order}? Tracking hasn't updated since {date}.",
    "My package says delivered but there's nothing at my door.",
    "The box arrived [crushed|soaking wet|torn open] and the {item} inside is broken.",
    "Can I change the delivery address for {order}? I moved to {city} last week.",
    "It's been {days} days and my {item} still hasn't shipped.",
    "The {carrier} tracking number doesn't work, it just says not found.",
    "~Do you ship to {country}?",
    "order {order} is late. when will it arrive",
    "I got someone else's package. It has order number {order} on it but it's not mine.",
    "Only half my order arrived, the {item} is missing.",
    "Delivery was supposed to be {date}. Still waiting.",
    "The driver left my package out in the rain and the {item} is [ruined|soaked].",
    "~How long does express shipping take to {city}?",
    "Can you hold my package at the {carrier} depot? I'm away until {when}.",
    "Tracking shows it went back to the warehouse. Why??",
    "I need the {item} before {when}, is there any way to speed up shipping?",
    "My order {order} has been 'out for delivery' for three days.",
    "Wrong item [shipped|in the box]. I ordered the {item} and got something completely different.",
    "~Is it possible to have it delivered to my office instead of my home address?",
    "{carrier} says the address is incomplete. It's apartment {apt}, they keep missing it.",
    "My parcel has been stuck in customs for {days} days. Can you help?",
    "Why was my order split into two shipments? One part arrived, the other didn't.",
    "~Do I need to be home to sign for order {order}?",
    "The estimated delivery keeps moving. First it was {date}, now it says next week.",
    "{carrier} marked my parcel as lost. What happens now, will you send another one?",
    "I typed my zip code wrong at checkout, can you fix it before it ships?",
    "Any update on {order}? It's a birthday gift and the party is {when}.",
    "The {item} arrived damaged and I'd like a replacement sent out.",
    "My parcel was delivered to the wrong house, a neighbour two streets away had it.",
    "Tracking for {order} says 'label created' and nothing else for {days} days.",
)

TECHNICAL = (
    "The app crashes every time I open it on my {device}.",
    "Getting '{error}' when I try to check out.",
    "The website is [super|really|painfully] slow today, pages take forever to load.",
    "I can't log in, it just spins and then says '{error}'.",
    "After the latest update the app won't even open on my {device}.",
    "The search bar doesn't return any results, even for things I know you sell.",
    "Push notifications stopped working on my {device}.",
    "The page goes blank when I click Save in settings. I'm using {browser}.",
    "I keep getting logged out every few minutes.",
    "The login button does nothing on {browser}. I click it and nothing happens.",
    "Your site shows a 500 error on the [orders|account|checkout] page.",
    "Images won't load in the app, just grey boxes everywhere.",
    "The app drains my battery like crazy since version {version}.",
    "I can't upload a profile picture. It says the file is too large but it's only {size} KB.",
    "Sync between my {device} and my laptop is broken, changes don't show up.",
    "Dark mode makes the text invisible on some screens.",
    "The checkout button is greyed out so I can't finish my order.",
    "It says 'session expired' right after I log in.",
    "The app freezes when I scroll through my order history.",
    "Is there an outage? Nothing is loading for me.",
    "The export button downloads an empty file, zero rows.",
    "Videos won't play, they just buffer forever in {browser}.",
    "The app keeps telling me to update but the store says it's already on version {version}.",
    "The links in your emails lead to a 404 page.",
    "The app force closes on my {device} whenever I tap the cart icon.",
    "The captcha keeps failing no matter what I do, so I can't sign in.",
    "The password reset link gives me an error: '{error}'.",
    "The date picker is broken, it won't let me choose anything after {when}.",
    "Half the app suddenly shows up in German even though my language is English.",
    "The website layout is completely broken on my {device}, buttons overlap the text.",
)

ACCOUNT = (
    "How do I change the email on my account to {email}?",
    "I want to reset my password but I don't remember which email I signed up with.",
    "Please change my username to {username}.",
    "~How do I turn on two-factor authentication?",
    "I got a new phone and lost my authenticator app. How do I get back into my account?",
    "Can I download a copy of all the data you have on me?",
    "I'd like to change the name on my profile, I [got married|got divorced|changed my surname].",
    "Someone changed my password without me knowing. I think my account was hacked.",
    "How do I merge two accounts? I accidentally made a second one with {email}.",
    "Please change the phone number on file, the new one ends in {digits}.",
    "Where do I update the default shipping address saved in my profile?",
    "~Can I add my partner as a second user on my account?",
    "How do I switch two-factor from SMS to an authenticator app?",
    "My account got locked after too many password attempts, can you unlock it?",
    "Under GDPR I'm requesting an export of all personal data linked to {email}.",
    "There's a sign-in from {city} in my security log that wasn't me.",
    "Is it possible to change my username? The old one has my ex's surname in it.",
    "I'm not getting the verification email to confirm my new address.",
    "How do I update my date of birth? It's wrong on my profile.",
    "change account email from {email} to {email2}",
    "~Where can I see which devices are signed in to my account?",
    "I'd like to move my account over to my work email, {email2}.",
    "~Can I set a different language for my profile?",
    "I need to change my password, it showed up in a data breach.",
    "How do I remove my old phone number from two-factor?",
    "I'd like a data export of my order history and personal info, in CSV if possible.",
    "Can you update the address on my profile? I can't find where the setting is.",
    "Need new backup codes for 2FA, I lost the old ones.",
    "How do I change my password? The settings page only shows my email.",
    "Can I hide my full name on my public profile and just show {username}?",
)

CANCELLATION = (
    "Please cancel my subscription.",
    "I want to cancel order {order} before it ships.",
    "How do I stop my {plan} plan from renewing on {when}?",
    "Close my account please, I won't be using it anymore.",
    "Cancel the order I placed by mistake this morning, {order}.",
    "I'd like to end my membership at the end of the current billing period.",
    "Turn off auto-renew please, I don't want to be charged again.",
    "How can I cancel? I can't find the button anywhere.",
    "I'm moving abroad and need to cancel my {plan} subscription.",
    "Please cancel and delete my account along with all my data.",
    "Can I cancel just the {item} from order {order}?",
    "Stop sending me the monthly box, I want out.",
    "cancel {plan}",
    "I signed up for the free trial and want to cancel before it converts on {when}.",
    "~What happens to my saved data if I close my account?",
    "Cancel order {order}, I found it cheaper elsewhere.",
    "I want to cancel my subscription while I'm travelling, I'll sign up again later.",
    "Please don't renew my annual plan this year.",
    "~How much notice do I need to give to cancel the {plan} plan?",
    "Is it too late to cancel {order}? It still says processing.",
    "My father passed away and I need to close his account.",
    "End my subscription immediately. I'm done with this service.",
    "Please cancel the recurring delivery of the {item}.",
    "Cancelling because the price went up, it's just not worth it anymore.",
    "I tried to cancel online but it keeps redirecting me to offers. Just cancel it please.",
    "Can you close my account but send me my order history first?",
    "Please terminate the {plan} plan for our company, effective {when}.",
    "I want to cancel, how do I do that from the app?",
    "I accidentally subscribed twice, please cancel one of them.",
    "Don't ship order {order}, I want to cancel it.",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "billing": BILLING,
    "shipping": SHIPPING,
    "technical": TECHNICAL,
    "account": ACCOUNT,
    "cancellation": CANCELLATION,
}

# Optional follow-up sentences that keep the message on-topic for its label.
EXTRAS: dict[str, tuple[str, ...]] = {
    "billing": (
        "I checked my bank statement twice.",
        "This is the second month in a row.",
        "I'd rather not dispute it with my bank if we can sort it out here.",
        "I have the receipt if you need it.",
        "My account number is {digits} if that helps.",
        "I'd like this sorted before my next billing date.",
    ),
    "shipping": (
        "The tracking page hasn't changed in days.",
        "I paid extra for express shipping.",
        "Nobody in my building has seen it.",
        "I have photos of the box if you need them.",
        "It was meant to be a gift.",
        "The carrier told me to contact you.",
        "I ordered it on {date}.",
    ),
    "technical": (
        "I already tried reinstalling.",
        "Cleared cache and cookies, same thing.",
        "It happens on wifi and on mobile data.",
        "It worked fine last week.",
        "Restarted my {device} too, no change.",
        "Screenshot attached.",
        "Tried on a second device as well, same problem.",
    ),
    "account": (
        "I'm on the {plan} plan if that matters.",
        "I can verify my identity if needed.",
        "I couldn't find the option in settings.",
        "The account was created with {email}.",
        "I've had this account for years so I don't want to lose it.",
    ),
    "cancellation": (
        "Please confirm by email once it's done.",
        "No need for a retention offer, thanks.",
        "It's nothing personal, I just don't use it anymore.",
        "I don't want any more charges after this.",
        "Please make sure it actually goes through this time.",
    ),
}

OPENINGS_POLITE = ("Hi,", "Hello,", "Hello team,", "Hi there,", "Good morning,",
                   "Good afternoon,", "Dear support,", "To whom it may concern,", "Hi support team,")
OPENINGS_CASUAL = ("Hey", "hey,", "Hi", "Yo,", "hello?", "Hi again,")
OPENINGS_ANGRY = ("URGENT:", "Hello??", "Again.", "Ok.")
CLOSINGS = ("Thanks", "Thanks!", "Thank you.", "Thanks in advance.", "Regards, {name}",
            "Best, {name}", "Cheers, {name}", "- {name}", "Thanks, {name}", "Kind regards, {name} {initial}.",
            "Sent from my iPhone", "Many thanks, {name}")
POLITE_ADDONS = ("Any help would be much appreciated.", "Sorry if this has been asked before.",
                 "Thanks in advance for looking into this.", "No rush, whenever you get a chance.",
                 "I appreciate your help.")
ANGRY_ADDONS = ("This is ridiculous.", "Third time I've contacted you about this.", "Absolutely unacceptable.",
                "Fix it or I'm taking my business elsewhere.", "I was on hold for an hour already.",
                "Seriously??", "Very disappointed.", "I want an answer today.")
RAMBLE_PREFIXES = ("So I've been a customer for about {years} years and never had an issue until now.",
                   "Ok this is a bit of a long story.", "Not sure if this is the right place to ask.",
                   "My daughter set this up for me so please bear with me.",
                   "I hate writing these emails but here goes.", "I already tried the help articles.")

NAMES = ("Dana", "Tom", "Priya", "Marco", "Aisha", "Ken", "Lucia", "Sam", "Olu", "Greta", "Jin",
         "Fatima", "Pete", "Rosa", "Viktor", "Mei", "Carlos", "Hannah", "Raj", "Nora", "Bill", "Ines")
PLANS = ("Basic", "Plus", "Pro", "Family", "Premium", "Team", "Starter", "Business")
DEVICES = ("iPhone 13", "iPhone 15", "Pixel 7", "Galaxy S22", "iPad", "MacBook", "Windows laptop",
           "Chromebook", "Galaxy Tab", "OnePlus 11", "Android tablet")
BROWSERS = ("Chrome", "Firefox", "Safari", "Edge", "Brave")
CARRIERS = ("UPS", "FedEx", "USPS", "DHL", "the courier")
ITEMS = ("blender", "headphones", "running shoes", "desk lamp", "phone case", "coffee grinder",
         "winter jacket", "yoga mat", "backpack", "kettle", "monitor stand", "water bottle",
         "keyboard", "rug", "air fryer", "bike helmet")
CITIES = ("Denver", "Leeds", "Austin", "Toronto", "Lyon", "Melbourne", "Dublin", "Portland",
          "Rotterdam", "Phoenix", "Glasgow", "Calgary")
COUNTRIES = ("Canada", "Ireland", "New Zealand", "Mexico", "Norway", "Japan", "Portugal", "South Africa")
ERRORS = ("Something went wrong", "Error 503", "code E-104", "Unexpected error, try again later",
          "ERR_CONNECTION_RESET", "Invalid token", "Request failed with status 500", "error 0x80070005")
PROMOS = ("SPRING20", "WELCOME10", "SAVE15", "FREESHIP", "BFRIDAY", "VIP25")
MONTHS = ("Jan", "Feb", "March", "April", "May", "June", "July", "Aug", "Sept", "Oct", "Nov", "Dec")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
MAIL_HOSTS = ("gmail.com", "outlook.com", "yahoo.com", "icloud.com", "proton.me", "work.co")

TYPO_WORDS = {"receive": "recieve", "definitely": "definately", "address": "adress", "the": "teh",
              "because": "becuase", "account": "acount", "payment": "paymnet", "cancelled": "canceld",
              "separate": "seperate", "subscription": "subscribtion", "really": "realy",
              "please": "pls", "order": "oder", "what": "waht"}


def _ordinal(d: int) -> str:
    suffix = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def _amount(rng: random.Random, currency: str) -> str:
    value = rng.choice((rng.uniform(3, 60), rng.uniform(60, 400), float(rng.choice((9, 12, 15, 29, 49, 99)))))
    text = f"{value:.0f}" if value.is_integer() and rng.random() < 0.5 else f"{value:.2f}"
    return currency + text


def _fillers(rng: random.Random) -> dict[str, str]:
    name = rng.choice(NAMES)
    plan, plan2 = rng.sample(PLANS, 2)
    currency = rng.choice(("$", "$", "$", "£", "€"))
    amount, amount2 = _amount(rng, currency), _amount(rng, currency)
    handle = rng.choice((name.lower(), f"{name.lower()}.{rng.choice('abcdefghkmrstw')}",
                         f"{name.lower()}{rng.randint(1, 99)}"))
    return {
        "name": name,
        "initial": rng.choice("ABCDEGHKLMNOPRSTW"),
        "order": rng.choice(("#", "#", "no. ", "")) + str(rng.randint(10000, 99999)),
        "amount": amount,
        "amount2": amount2 if amount2 != amount else amount + "0",
        "date": rng.choice((f"{rng.choice(MONTHS)} {rng.randint(1, 28)}", f"the {_ordinal(rng.randint(1, 28))}",
                            rng.choice(WEEKDAYS), f"{rng.randint(1, 12)}/{rng.randint(1, 28)}")),
        "when": rng.choice((f"{rng.choice(MONTHS)} {rng.randint(1, 28)}", f"the {_ordinal(rng.randint(1, 28))}",
                            rng.choice(WEEKDAYS), f"{rng.randint(1, 12)}/{rng.randint(1, 28)}")),
        "plan": plan,
        "plan2": plan2,
        "device": rng.choice(DEVICES),
        "browser": rng.choice(BROWSERS),
        "carrier": rng.choice(CARRIERS),
        "item": rng.choice(ITEMS),
        "city": rng.choice(CITIES),
        "country": rng.choice(COUNTRIES),
        "error": rng.choice(ERRORS),
        "promo": rng.choice(PROMOS),
        "card": f"{rng.choice(('Visa', 'Mastercard', 'Amex', 'card'))} ending {rng.randint(1000, 9999)}",
        "days": str(rng.randint(3, 21)),
        "years": str(rng.randint(2, 9)),
        "apt": f"{rng.randint(1, 40)}{rng.choice(('', '', 'B', 'C'))}",
        "digits": str(rng.randint(1000, 9999)),
        "version": f"{rng.randint(3, 7)}.{rng.randint(0, 12)}.{rng.randint(0, 9)}",
        "size": str(rng.randint(200, 900)),
        "email": f"{handle}@{rng.choice(MAIL_HOSTS)}",
        "email2": f"{name.lower()}.{rng.choice(('work', 'new', 'home'))}@{rng.choice(MAIL_HOSTS)}",
        "username": rng.choice((f"{name.lower()}_{rng.randint(10, 999)}", f"the_real_{name.lower()}",
                                f"{name}{rng.choice(('Runs', 'Cooks', 'Reads', 'Plays'))}")),
    }


_ALT = re.compile(r"\[([^\[\]]+)\]")


def _render(rng: random.Random, template: str, slots: dict[str, str]) -> str:
    text = _ALT.sub(lambda m: rng.choice(m.group(1).split("|")), template)
    return text.format(**slots)


def _sentence_count(text: str) -> int:
    return max(1, len(re.findall(r"[.!?]+(?:\s|$)", text)))


def _typo(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    for _ in range(rng.choice((1, 1, 2))):
        idx = [i for i, w in enumerate(words) if w.isalpha() and (len(w) >= 4 or w.lower() in TYPO_WORDS)]
        if not idx:
            break
        i = rng.choice(idx)
        w = words[i]
        if w.lower() in TYPO_WORDS and rng.random() < 0.6:
            words[i] = TYPO_WORDS[w.lower()]
            continue
        j = rng.randrange(1, len(w) - 1)
        op = rng.choice(("swap", "drop", "double"))
        if op == "swap":
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        elif op == "drop":
            words[i] = w[:j] + w[j + 1:]
        else:
            words[i] = w[:j] + w[j] + w[j:]
    return " ".join(words)


def _message(rng: random.Random, label: str) -> str:
    """Compose one message: opening, core, optional extras, tone add-ons, closing."""
    slots = _fillers(rng)
    template = rng.choice(TEMPLATES[label])
    extras = () if template.startswith("~") else EXTRAS[label]
    core = _render(rng, template.lstrip("~"), slots)
    if core[-1] not in ".?!":
        core_terminated = core + rng.choice((".", "", "?" if core.lower().startswith(("how", "where", "can")) else "."))
    else:
        core_terminated = core
    tone = rng.choices(("neutral", "polite", "angry", "terse", "rambling"), weights=(30, 25, 15, 18, 12))[0]
    if tone == "angry" and not extras:
        tone = "neutral"  # plain questions ("Do you ship to Canada?") don't get angry add-ons

    if tone == "terse":
        text = core.rstrip(".")
        if rng.random() < 0.5:
            text = text.lower()
        if rng.random() < 0.15:
            text += rng.choice((" asap", " thx", " pls", " ??"))
        return _typo(rng, text) if rng.random() < 0.15 else text

    body = [core_terminated]
    budget = 3 - _sentence_count(core_terminated)

    def add(sentence: str, front: bool = False) -> None:
        nonlocal budget
        if budget > 0:
            body.insert(0, sentence) if front else body.append(sentence)
            budget -= 1

    opening, closing = "", ""
    if tone == "polite":
        opening = rng.choice(OPENINGS_POLITE)
        if extras and rng.random() < 0.4:
            add(_render(rng, rng.choice(extras), slots))
        if rng.random() < 0.6:
            add(rng.choice(POLITE_ADDONS))
        closing = rng.choice(CLOSINGS) if rng.random() < 0.8 else ""
    elif tone == "angry":
        opening = rng.choice(OPENINGS_ANGRY) if rng.random() < 0.3 else ""
        add(rng.choice(ANGRY_ADDONS))
        if extras and rng.random() < 0.3:
            add(_render(rng, rng.choice(extras), slots))
        if rng.random() < 0.3:
            body = [s[:-1] + "!" if s.endswith(".") else s for s in body]
        if rng.random() < 0.1:
            body = [s.upper() for s in body]
    elif tone == "rambling":
        add(_render(rng, rng.choice(RAMBLE_PREFIXES), slots), front=True)
        if extras:
            add(_render(rng, rng.choice(extras), slots))
        opening = rng.choice(OPENINGS_CASUAL + OPENINGS_POLITE) if rng.random() < 0.5 else ""
        closing = rng.choice(CLOSINGS) if rng.random() < 0.5 else ""
    else:  # neutral
        opening = rng.choice(OPENINGS_POLITE + OPENINGS_CASUAL) if rng.random() < 0.5 else ""
        if extras and rng.random() < 0.35:
            add(_render(rng, rng.choice(extras), slots))
        closing = rng.choice(CLOSINGS) if rng.random() < 0.35 else ""

    main = " ".join(body)
    first = main.split(" ", 1)[0]
    if opening.endswith(",") and first.istitle() and not first.startswith("I") and rng.random() < 0.8:
        main = main[0].lower() + main[1:]  # "Hi, please cancel ..." rather than "Hi, Please ..."
    text = " ".join(part for part in (opening, main, closing.format(**slots)) if part)
    return _typo(rng, text) if rng.random() < 0.07 else text


def make_examples(n: int = 500, seed: int = 0) -> list[dict]:
    """Return ``n`` labelled messages, balanced over LABELS, shuffled, unique texts, deterministic per seed."""
    if n < 0:
        raise ValueError("n must be non-negative")
    rng = random.Random(seed)
    labels = list(LABELS)
    base, extra = divmod(n, len(labels))
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for i, label in enumerate(labels):
        want = base + (1 if i < extra else 0)
        made, tries = 0, 0
        while made < want:
            tries += 1
            if tries > 1000 + want * 200:
                raise RuntimeError(f"could not generate {want} unique {label!r} messages")
            text = _message(rng, label)
            if text in seen:
                continue
            seen.add(text)
            pairs.append((text, label))
            made += 1
    rng.shuffle(pairs)
    width = max(4, len(str(n)))
    return [{"id": f"t{i:0{width}d}", "text": text, "label": label}
            for i, (text, label) in enumerate(pairs, start=1)]


def write_demo_data(path: pathlib.Path, n: int = 500, seed: int = 0) -> pathlib.Path:
    """Write make_examples(n, seed) to ``path`` as UTF-8 JSONL, atomically; return the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = make_examples(n, seed)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
