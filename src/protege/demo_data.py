"""Synthetic customer-support tickets with gold intent labels for ``protege demo``.

Generated locally from hand-written templates and slot fillers (no downloaded text), so the demo data set is
reproducible from a seed alone. The tickets are meant to read like real ones, so that no single keyword gives
the label away: each intent is written many ways (a good share without the obvious word), one in five
tickets mentions a second topic in passing (the gold label is the one they ask about), a quarter carry typos
or lost capitals and punctuation, a quarter are long (greeting, context, the ask, a detail, a sign-off) and
about one in eight is a few words ("refund??"); the register runs from formal letters to one-line texts.

Every label-specific fragment (an intent, a follow-up detail, a passing mention) has a template id.
``write_demo_data`` splits those ids per label into a training pool and a held-out pool, so a held-out ticket
never shares a fragment with a training ticket: the held-out score measures generalisation, not template
recall. Greetings, sign-offs and neutral context carry no label and are shared.

Most of this module is the templates themselves; the generator is the last ~250 lines.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ProtegeError

__all__ = [
    "HELD_OUT_SHARE",
    "LABELS",
    "SHARES",
    "Ticket",
    "demo_tickets",
    "make_examples",
    "make_tickets",
    "sentence_count",
    "split_pools",
    "write_demo_data",
]

# The embedding teacher scores each ticket against f"{name}: {description}", so each is one plain sentence.
LABELS: dict[str, str] = {
    "billing": "money: charges, double or unexpected payments, refunds, invoices and receipts, prices and fees, "
    "discounts and payment methods",
    "shipping": "the parcel or delivery: tracking the order, late, lost, damaged or missing packages, wrong items, "
    "changing the delivery address, shipping times and costs",
    "technical": "the app or website is broken: crashes, error messages, bugs, blank or frozen pages, things not "
    "loading, slowness",
    "account": "account settings: changing the email, password, username, name or phone number on the profile, "
    "two-factor login security, a hacked or locked account, my personal data",
    "cancellation": "the customer wants to cancel or end a subscription, membership, plan or order, stop renewal, "
    "or close and delete the account",
}

# The generator's promises, per label (exact quotas, rounded): ticket shapes, tickets that mention a second
# topic in passing (among the non-short ones), and tickets with typos or lost case and punctuation.
SHARES = {"short": 0.12, "long": 0.25, "two_topic": 0.2, "typo": 0.25}
HELD_OUT_SHARE = 0.25  # of each label's template ids in each pool, for the held-out file

# ---------------------------------------------------------------------------------------------------------------
# Templates. ``{slot}`` is filled from _fillers(); ``[a|b]`` picks one alternative. In CORES, a leading "~" marks a
# plain question (no complaint-style detail follows it) and a leading "other>" a hand-written two-topic ticket whose
# passing topic is the label ``other``.

CORES: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was {charged} {amount} twice for order {order}.",
        "Why did my bill go up to {amount} this month? Nobody told me the {plan} price was changing.",
        "You took {amount} from my [card|account] on {date} and I have no idea what it's for.",
        ("Can I get [an invoice|a proper invoice|a VAT invoice] for order {order}? Our accounts team needs one with "
        "the company name on it."),
        "My {card} expired, how do I put a new one on file so the next payment goes through?",
        "Still waiting on the money back for the {item} I returned {days} days ago.",
        "~Is there a student discount for {plan}?",
        ("There's a {amount} line on my [bank statement|credit card statement] with your name on it and I never "
        "bought anything."),
        "~How much extra per month would it be to go from {plan} to {plan2}?",
        "My card keeps getting declined at checkout, but it works fine everywhere else.",
        "The code {promo} didn't take anything off, I paid the full {amount}.",
        "I picked monthly but got billed for a whole year up front.",
        "~Can I pay by [PayPal|Apple Pay|bank transfer] instead of card?",
        "You hit me with a {amount} late fee even though I paid on {date}.",
        "I was told I'd get {amount2} back for the damaged {item} and it never showed up in my account.",
        "Our order was supposed to be tax exempt but you added sales tax. Can the invoice be corrected?",
        "The checkout page said {amount2} and then my card was {charged} {amount}. Which one is right?",
        "The trial was supposed to be free, so why did {amount} just come out of my account?",
        "Could you send me a receipt for the {amount} I paid on {date}? I need it for my expenses.",
        "My [wife|husband|partner] and I are both paying for {plan}, we only need one of those.",
        "There's a pending {amount} hold on my card and nothing has even been sent yet.",
        "~Is it possible to split the cost of order {order} across two cards?",
        "~Are your prices shown with VAT included or is that added at the end?",
        "It renewed and took {amount} on {date} before I had a chance to downgrade. Any chance of getting that back?",
        "The {item} was on sale for {amount2} but I ended up paying {amount}. Please sort out the difference.",
        "How come I'm paying more than my friend for exactly the same {plan} plan?",
        "I need a copy of every invoice from last year for my tax return.",
        "From now on please put the payments on my company card ending {digits} instead of my personal one.",
        "My bank flagged a payment to you as suspicious. Was that {amount} a real charge?",
        "You sent back {amount2} but I paid {amount}, where is the rest?",
        "~Do you have anything cheaper than {plan}? {amount} a month is a lot for me right now.",
        "The price on my renewal notice is {amount}, last year it was {amount2}. What changed?",
        "The currency on my invoice is wrong, I should be paying in [euros|pounds|dollars].",
        "My gift card should have {amount2} left on it but checkout only lets me use part of it.",
        "Could you explain what the '{plan} service fee' on my latest statement is?",
        "~Is there any way to pay in instalments? I can't do {amount} all at once.",
        "The amount that left my account doesn't match the invoice you emailed me.",
        "Money left my account twice for the same thing on {date}.",
        "I'd like a price match, I found the {item} for {amount2} somewhere else.",
        "Where can I download my receipts? I need them to get reimbursed at work.",
        "technical>The app crashed in the middle of checkout and now I can see two charges of {amount} on my card.",
        ("shipping>I paid {amount} for express delivery and it came in the normal time anyway, so I'd like that fee "
        "credited back."),
        ("cancellation>I cancelled weeks ago and you're still taking {amount} every month. I want those payments "
        "returned."),
        "account>Somebody got into my profile and bought things with my card. Please reverse those {amount} payments.",
        "shipping>Only half of order {order} arrived, so I shouldn't be paying the full {amount} for it.",
        ("technical>The page froze right after I hit pay. Did the {amount} actually go through or do I need to pay "
        "again?"),
        "I'd like a refund for order {order}, [the {item} was faulty|I sent it back on {date}].",
        "Can you [refund|give me back] the {amount} you {charged} me by mistake?",
        "My [invoice|bill] for {date} shows a charge I don't recognise.",
        "Why was I {charged} {amount} when my plan is only {amount2}?",
        "The payment failed but the money still left my account.",
        "I was billed {amount} for {plan} but I'm on {plan2}.",
        "Please [issue|send] a credit note for the overcharge on invoice {digits}.",
        "The refund you promised on {date} still isn't on my card.",
        "~Can I change the card you charge each month?",
        "I got {charged} a fee I never agreed to.",
        "~When will I be billed for next month?",
        "I want my money back for the {item}, it was a complete waste.",
        "The price at checkout was higher than the one on the product page.",
        "My payment of {amount} [shows up|appears] twice in my banking app.",
    ),
    "shipping": (
        "Where is order {order}? The tracking hasn't moved since {date}.",
        "It says delivered but there's nothing at my door, and the neighbours don't have it either.",
        "The box showed up [crushed|soaking wet|ripped open] and the {item} inside is broken.",
        "Can the {parcel} for {order} go to my new place in {city} instead? I moved last week.",
        "It's been {days} days and my {item} still hasn't left your warehouse.",
        "The {carrier} number you gave me just says 'not found'.",
        "~Do you send orders to {country}?",
        "When is my stuff actually going to get here? I ordered on {date}.",
        "I got someone else's {parcel}, the label has a different name and order {order} on it.",
        "Only part of my order turned up, the {item} wasn't in the box.",
        "It was meant to be here on {date} and I'm still waiting.",
        "The driver left it out in the rain and the {item} is [ruined|soaked].",
        "~How many days would express take to {city}?",
        "Can you ask {carrier} to hold it at the depot? I'm away until {when}.",
        "Tracking says the {parcel} is on its way back to you. Why?",
        "I really need the {item} before {when}, can it be sent any faster?",
        "Order {order} has been 'out for delivery' for three days now.",
        "I ordered the {item} and the box had something completely different in it.",
        "~Could it be sent to my office rather than my home?",
        "{carrier} keeps saying the address is incomplete. It's flat {apt}, they just miss it.",
        "My {parcel} has been sitting in customs for {days} days, what can I do?",
        "Half of it came on {date} and the rest is nowhere to be seen.",
        "~Does someone need to be home to sign for it?",
        "The arrival date keeps moving, first it was {date} and now it says next week.",
        "{carrier} says they lost my {parcel}. Are you sending another one?",
        "I typed the wrong postcode at checkout, can you fix it before it goes out?",
        "Any news on {order}? It's a birthday present and the party is on {when}.",
        "A neighbour two streets away ended up with my {parcel}.",
        "The tracking for {order} has said 'label created' for {days} days.",
        "The courier never even knocked, just left a card saying I wasn't in.",
        "~Can I collect it from a store instead of waiting for another attempt?",
        "The {item} arrived with a big dent in it, the packaging had clearly been dropped.",
        "~What does 'in transit to local facility' mean? It has said that since {date}.",
        "I was promised next-day and it's now day four.",
        "The {parcel} was left in the lobby of my building and now it's gone.",
        "~Is there a way to change the day it comes? Nobody is home on {when}.",
        "The box was open and half empty when it got to me.",
        "My order shows as sent but {carrier} has no record of it.",
        "It went to my old address even though I changed it at checkout.",
        "The van came while I was home and drove off without stopping.",
        "Nothing has turned up yet and it's been over two weeks.",
        "Can you leave it with reception next time? They keep taking it back to the depot.",
        "billing>I paid {amount} extra for next-day and it still hasn't come. Where is it?",
        "technical>The tracking page won't load for me, can you just tell me where order {order} is?",
        ("cancellation>I almost cancelled because it's so late, but honestly I'd rather just know when the {item} will "
        "get here."),
        "account>I updated the address in my profile but the {parcel} still went to the old one in {city}.",
        "My [{parcel}|{parcel}|order] still hasn't arrived and it's been {days} days.",
        "The tracking number for {order} isn't working.",
        "~When will order {order} be delivered?",
        "[The delivery|My {parcel}] was marked as delivered on {date} but I never got it.",
        "Can you send a replacement? The {item} arrived broken.",
        "I need to change the shipping address on order {order}.",
        "The [courier|{carrier} driver] came while I was at work, can they try again on {when}?",
        "~How much is shipping to {country}?",
        "My {parcel} has been stuck at the same depot for a week.",
        "The wrong size {item} was delivered to me.",
        "~Can I track my order without signing in?",
        "The {parcel} is [late|overdue] and the tracking hasn't updated.",
        "I was sent the same {item} twice, do you want the extra one back?",
        "My delivery is missing items.",
    ),
    "technical": (
        "The {app} closes itself every time I open it on my {device}.",
        "I get '{error}' when I try to check out.",
        "Your site is [super|really|painfully] slow today, every page takes ages.",
        "I can't sign in, it just spins and then shows '{error}'.",
        "Since the last update the {app} won't even start on my {device}.",
        "Search returns nothing, even for things I know you sell.",
        "I stopped getting notifications on my {device}.",
        "The page goes blank when I press Save in settings. I'm on {browser}.",
        "It keeps kicking me out every few minutes and I have to sign in again.",
        "The sign in button does nothing on {browser}, I click it and nothing happens.",
        "I get a 500 error on the [orders|checkout|account] page.",
        "Pictures don't load in the {app}, just grey boxes everywhere.",
        "Since version {version} the {app} eats my battery.",
        "Uploading a photo fails, it says the file is too large but it's only {size} KB.",
        "Changes I make on my {device} don't show up on my laptop anymore.",
        "In dark mode half the text is invisible.",
        "The checkout button is greyed out so I can't finish.",
        "Right after signing in I get 'session expired'.",
        "Scrolling through my order history freezes the whole {app}.",
        "Is something down? Nothing loads for me.",
        "The export downloads an empty file.",
        "Videos just buffer forever in {browser}.",
        "The {app} keeps asking me to update but I'm already on {version}.",
        "The links in your emails go to a page that doesn't exist.",
        "Tapping the cart icon makes the {app} shut on my {device}.",
        "The captcha fails every time no matter what I pick.",
        "The date picker won't let me choose anything after {when}.",
        "Part of the {app} is suddenly in German although my language is English.",
        "The layout is a mess on my {device}, buttons sit on top of the text.",
        "The page just reloads when I press submit and nothing happens.",
        "I get a white screen after the logo and then nothing.",
        "Your website says my browser is unsupported but I'm on the latest {browser}.",
        "The {app} is stuck on the loading screen.",
        "Every time I try to open my saved list I get '{error}'.",
        "Sound cuts out whenever I play something in the {app}.",
        "Some products show the price as 'NaN' in the {app}.",
        "The filters on the search page reset every time I click one.",
        "The {app} says there's no internet connection when I'm clearly online.",
        "Buttons on the website don't respond when I click them.",
        "Forms lose everything I typed when I go back a page.",
        "I get a certificate warning when I open your site in {browser}.",
        "Something broke this morning, the {app} won't go past the first screen.",
        "billing>Every time I enter my card details the page throws '{error}'. The card itself is fine.",
        ("account>I changed my password without a problem, but now the {app} on my {device} crashes as soon as I sign "
        "in."),
        "shipping>The tracking map in the {app} is just a blank grey square, it never shows anything.",
        "cancellation>I'm close to giving up on you over this: the {app} has crashed on me five times today.",
        "The {app} [crashes|keeps crashing] when I try to [pay|open my orders|search].",
        "I'm getting an error message: '{error}'.",
        "The website won't load on {browser}.",
        "There's a bug in the {app}: the back button [takes me to the home screen|does nothing].",
        "The {app} is [very slow|lagging badly] on my {device} since the update.",
        "Your site keeps timing out.",
        "The {app} crashed and now it won't open at all.",
        "~Is there a known problem with the website right now?",
        "The page shows '{error}' whenever I refresh.",
        "The {app} logs me out and then says '{error}' when I try to sign back in.",
        "Nothing happens when I tap [Buy|Add to cart|Continue] in the {app}.",
        "The {app} won't install on my {device}.",
        "Every page on the site loads without any styling, just plain text.",
        "The website crashes my {browser} tab.",
    ),
    "account": (
        "How do I change the email on my {acct} to {email}?",
        "I want to reset my password but I can't remember which email I used.",
        "Please change my username to {username}.",
        "~How do I turn on two-factor?",
        "New phone, lost my authenticator app, how do I get back in?",
        "~Can I download a copy of all the data you hold about me?",
        "I'd like to change the name on my {acct}, I [got married|changed my surname].",
        "Someone changed my password and it wasn't me. I think I've been hacked.",
        "I accidentally made a second {acct} with {email}, can the two be merged?",
        "Please update the phone number you have for me, the new one ends in {digits}.",
        "Where do I change the default address saved in my {acct}?",
        "~Can I add my partner as a second user?",
        "How do I switch the security codes from text message to an app?",
        "I'm locked out after too many wrong attempts, can you unlock me?",
        "Under GDPR, please send me everything you have linked to {email}.",
        "There's a sign-in from {city} in my security history that wasn't me.",
        "Can my username be changed? The old one has my ex's surname in it.",
        "The verification email for my new address never arrives.",
        "My date of birth is wrong on my {acct}, how do I fix it?",
        "change my email from {email} to {email2}",
        "~Where can I see which devices are signed in as me?",
        "I'd like to move everything over to my work address, {email2}.",
        "~Can I set a different language on my {acct}?",
        "My password turned up in a data breach, I need to set a new one.",
        "How do I take my old number off two-factor?",
        "I need new backup codes, I lost the old ones.",
        "How do I change my password? Settings only shows my email.",
        "Can I hide my full name on my public profile and just show {username}?",
        "I never asked for a password reset but I just got the email, should I be worried?",
        "Can you tell me which email address I'm registered under?",
        "I want to make my [daughter|son] the owner of our family login instead of me.",
        "~Is there a way to sign in with Google instead of a password?",
        "Please remove my old home address from my {acct}, I don't live there anymore.",
        "My {acct} shows the wrong country and I can't change it in settings.",
        "I can't remember my login details at all, not the email and not the password.",
        "~What is the security question for, and can I change mine?",
        "I'm still registered under my old company email, which I can't get into anymore.",
        "Please turn off the marketing emails and texts in my settings.",
        "~Is my personal information shared with anyone? I'd like to see what you store.",
        "I'd like to sign in with my phone number instead of an email.",
        "Two people in our house share one login, can we each have our own?",
        "I sent a copy of my new ID last week, can you confirm my name has been changed?",
        ("billing>My receipts go to {email}, which I no longer use. How do I change the email on my {acct} to "
        "{email2}?"),
        "technical>The app glitched yesterday and logged me out, so now I'd like to turn on two-factor to be safe.",
        ("cancellation>I was going to close everything, but I'd rather just change the email on my {acct} to "
        "{email2}."),
        ("shipping>My parcels still come addressed to my old name, please update the name on my {acct} to {name} "
        "{initial}."),
        "I forgot my password and the reset link isn't [coming|arriving].",
        "~How do I update my {acct} email?",
        "Please [reset|help me reset] the password on my {acct}.",
        "I think someone else is using my {acct}, my password and email were both changed.",
        "~How do I change my username?",
        "My {acct} is locked, how do I get back in?",
        "I need to update the phone number on my {acct}.",
        "Please verify my {acct}, the code never came.",
        "~How do I set up two-factor authentication?",
        "Can you change the email on my {acct}? I don't have access to the old one.",
        "I want to change my {acct} password.",
        "I'd like a copy of my personal data.",
        "My login email is wrong, it's missing a letter.",
        "Please add a second email address to my {acct}.",
    ),
    "cancellation": (
        "Please {cancel} my {sub}.",
        "I want to {cancel} order {order} before it goes out.",
        "How do I stop the {plan} plan renewing on {when}?",
        "Close my account please, I won't be using it anymore.",
        "I placed an order by mistake this morning ({order}), please stop it.",
        "I'd like to end my {sub} at the end of this period.",
        "Turn off auto-renew please, I don't want to pay again.",
        "How do I get out of this? I can't find the option anywhere.",
        "I'm moving abroad and won't need {plan} anymore, please end it.",
        "Please shut down my account and delete everything.",
        "Can I take the {item} off order {order} before it ships?",
        "Stop sending me the monthly box, I want out.",
        "{cancel} {plan}",
        "I'm on the free trial and want to stop before it turns into a paid plan on {when}.",
        "~What happens to my saved stuff if I close my account?",
        "I found it cheaper elsewhere, please call off order {order}.",
        "I'd like to end my {sub} while I'm travelling, I may come back later.",
        "Please don't renew my yearly plan this time.",
        "~How much notice do I have to give to end {plan}?",
        "Is it too late to stop {order}? It still says processing.",
        "My father passed away and I need to close his account.",
        "I'm done with this service, end it today.",
        "Please stop the repeat delivery of the {item}.",
        "The price went up and it's not worth it to me anymore, so I'm leaving.",
        "I tried to quit online but it keeps showing me offers. Just end it please.",
        "Can you close my account but send me my order history first?",
        "Please terminate our company's {plan} plan, effective {when}.",
        "~How do I end my plan from the app?",
        "I subscribed twice by accident, please get rid of one of them.",
        "Don't send order {order}, I don't want it anymore.",
        "I no longer want to be a member.",
        "Not renewing. Please confirm the plan ends on {when}.",
        "I'd like to drop the paid plan completely, not downgrade.",
        "Please unsubscribe me from the {plan} plan.",
        "I've changed my mind about the {item}, can you stop the order?",
        "I want to leave, what's the quickest way?",
        "Stop my plan at the end of the month please.",
        "We won't be needing the team plan after {when}, please close it.",
        "Can I still back out of the order I made yesterday?",
        "I'd like to opt out of the next renewal.",
        "Delete my account, I'm not coming back.",
        "Please scrap the whole order, I'll order again later.",
        "billing>You charged me twice last month, so I'm ending the {plan} plan today.",
        "technical>The app barely works for me anymore, so I'd like to end my {sub}.",
        "shipping>The last three boxes were all late, so please stop my {sub}.",
        "account>I don't want to reset my password yet again, just close the account.",
        "Please {cancel} my [{sub}|{sub}|plan] straight away.",
        "I want to {cancel} my order {order}.",
        "~How do I {cancel} my {sub}?",
        "Cancel my {plan} plan please, effective immediately.",
        "I don't want the renewal, please {cancel} it.",
        "Please {cancel} the auto-renewal on my account.",
        "I'd like to {cancel} the order I placed on {date}.",
        "Please close my account and stop everything.",
        "Can I {cancel} the {item} I ordered yesterday?",
        "I need to {cancel}, it's too expensive for me now.",
        "~Can I {cancel} in the middle of the month?",
        "Cancel everything please, I'm leaving.",
        "I would like to {cancel} my {sub} now.",
        "Please {cancel} my trial before it renews.",
    ),
}

SHORTS: dict[str, tuple[str, ...]] = {
    "billing": ("refund", "double charged", "wrong amount on my invoice", "need a receipt", "why was i {charged}",
                "money taken twice", "invoice please", "{charged} after the free trial", "promo code didn't work",
                "price went up", "where's my refund", "overcharged again", "payment declined", "charged {amount}"),
    "shipping": ("where is my {parcel}", "{parcel} still not here", "tracking not updating", "wrong item in the box",
                 "box arrived smashed", "still no delivery", "where's my order", "{parcel} lost", "late delivery",
                 "new delivery address", "order {order} not delivered", "{parcel} damaged", "when will it arrive",
                 "never got my {parcel}"),
    "technical": ("{app} keeps crashing", "site down", "error at checkout", "page won't load", "blank screen",
                  "{app} frozen", "nothing loads", "search is broken", "{app} won't open", "getting '{error}'",
                  "bug in the {app}", "website not working", "{app} crashed again", "error {digits}"),
    "account": ("password reset", "change my email", "lost my 2fa codes", "update phone number", "{acct} hacked",
                "change username", "locked out of my {acct}", "new email address", "export my data",
                "verification email missing", "forgot password", "can't reset password", "update my {acct}",
                "someone is in my {acct}"),
    "cancellation": ("cancel please", "cancel my order", "stop my {sub}", "close my account", "end my {sub}",
                     "unsubscribe me", "no more boxes", "don't renew", "cancel order {order}", "i want out",
                     "cancel {sub}", "please cancel", "cancel the renewal", "cancel everything"),
}

# On-topic follow-up sentences for longer tickets.
DETAILS: dict[str, tuple[str, ...]] = {
    "billing": (
        "I checked my bank statement twice.",
        "This is the second month I've been {charged} wrong.",
        "I'd rather not dispute the charge with my bank if we can sort it out here.",
        "I have the receipt if you need it.",
        "My customer number is {digits} if that helps.",
        "I'd like this fixed before the next payment date.",
        "Money is tight this month so every charge matters.",
        "The confirmation email showed a different total.",
        "I only ever paid for one.",
        "My card statement is attached.",
        "I've been overcharged before, so I keep an eye on my payments.",
        "{amount} is too much to just ignore.",
        "My bank says the payment came from you.",
        "I'd like the refund on the same card.",
        "I need the invoice for my accountant.",
        "It shows up under your company name on my statement.",
    ),
    "shipping": (
        "The tracking page hasn't changed in days.",
        "I paid extra for fast delivery.",
        "Nobody in my building has seen the {parcel}.",
        "I have photos of the box if you need them.",
        "It was meant to be a gift.",
        "The courier told me to contact you.",
        "I ordered it on {date}.",
        "I was home all day waiting for the delivery.",
        "My postcode is definitely right on the order.",
        "It's the second {parcel} this has happened with.",
        "The tracking number starts with {digits}.",
        "I live in a flat, so the door number matters for delivery.",
        "I checked with the post office too.",
        "The shipping label had my name spelt right.",
        "It's a big box, it can't just vanish.",
        "I need the {parcel} for a trip on {when}.",
    ),
    "technical": (
        "I already tried reinstalling the {app}.",
        "Cleared cache and cookies, same thing.",
        "It happens on wifi and on mobile data.",
        "It worked fine last week.",
        "Restarted my {device} too, no change.",
        "Screenshot of the error attached.",
        "Tried on a second device as well, same bug.",
        "I'm on the newest version of the {app}.",
        "My friend has the same problem on hers.",
        "It happens every single time, not just once.",
        "I'm using {browser} on a {device}.",
        "The error pops up straight away.",
        "It started after the last update.",
        "Other sites load fine on the same connection.",
        "I turned it off and on again, no luck.",
        "I can send a screen recording of the crash.",
    ),
    "account": (
        "I can verify who I am if needed.",
        "I couldn't find the option in my {acct} settings.",
        "The {acct} was set up with {email}.",
        "I've had this {acct} for years so I don't want to lose anything.",
        "I'm the only person who uses the {acct}.",
        "I no longer have the old phone for the codes.",
        "I'd like to keep my order history.",
        "I can send a photo of my ID.",
        "My old email was {email}.",
        "I want to make sure nobody else can log in.",
        "I set the {acct} up years ago with an old email address.",
        "I don't want to lose my saved lists.",
        "My partner can confirm my details.",
        "The settings page doesn't let me edit it.",
        "I'm worried someone else can see my personal details.",
        "I have my order number to prove it's me.",
    ),
    "cancellation": (
        "Please confirm by email once it's cancelled.",
        "I don't want to be charged again after this.",
        "It's nothing personal, I just don't use it.",
        "I've made up my mind.",
        "I'd like this done today.",
        "No need to send me any offers to stay.",
        "I already removed the app.",
        "Please don't try to talk me out of it.",
        "Thanks for the service until now.",
        "I may come back at some point.",
        "I won't be renewing after this.",
        "I don't need the {sub} anymore.",
        "Please stop any further renewals.",
        "I've found something that suits me better.",
        "Money is tight, so the {sub} has to go.",
        "I'd like written confirmation of the cancellation.",
    ),
}

# A second topic mentioned in passing: clauses (lower-case start, no full stop) used inside FRAMES.
MENTIONS: dict[str, tuple[str, ...]] = {
    "billing": (
        "the payment itself went through fine", "I've already paid {amount} for it", "my card was charged on {date}",
        "the price went up a bit too", "the refund for my last order did come through",
        "I got a receipt I didn't quite understand", "the invoice was fine",
        "I'm still a bit annoyed about the delivery fee",
        "the last invoice looked a bit high",
        "I paid by card as usual",
        "my refund from {date} is still pending",
        "I noticed a small fee on my statement",
    ),
    "shipping": (
        "the parcel itself arrived on time", "my last delivery was late as well", "the box turned up on {date}",
        "the courier was really nice", "the package was a bit battered", "I'm still waiting on another order",
        "the tracking said it would come {when}", "the {item} did arrive eventually",
        "my last parcel came a day late",
        "the delivery before this one was fine",
        "the courier left it with a neighbour last time",
        "I'm expecting another delivery on {when}",
    ),
    "technical": (
        "the app was a bit slow earlier", "your website logged me out twice today", "the page froze for a second",
        "I had to refresh a few times", "the app crashed once this morning", "I got an odd error earlier",
        "the site looks different since the update", "the app on my {device} is fine now",
        "the website was down for a bit yesterday",
        "I had to reinstall the app last week",
        "the page showed '{error}' once",
        "the app is a bit buggy lately",
    ),
    "account": (
        "I changed my email recently", "I reset my password last week", "I just set up two-factor",
        "my username is {username}", "I'm registered under {email}", "I updated my phone number last month",
        "I made a new profile a while ago", "I had to verify my email again",
        "I logged in with my new email",
        "I changed my username a while back",
        "my password expired last month",
        "I added my phone number to my profile",
    ),
    "cancellation": (
        "I did think about cancelling at one point", "I almost left last month",
        "I cancelled a different order last week", "I'm not planning to leave",
        "my friend just closed her account", "I was close to ending my plan",
        "I cancelled my other subscription", "I thought about quitting the {plan} plan",
        "I nearly cancelled my plan last year",
        "I'm not cancelling anything",
        "I stopped my other membership",
        "I'm happy to keep my subscription",
    ),
}

# How a passing mention sits in a ticket: "{m}" a mention, "{M}" the same capitalised, "{c}" the core.
FRAMES = (
    "{M}, but that's not why I'm writing. {c}",
    "{c} Also {m}, but that's a separate thing.",
    "{c} ({M}, though that's not the issue.)",
    "{M}. Anyway, {c}",
    "{c} Side note: {m}.",
    "So {m}, fine. {c}",
    "{c} Btw {m}.",
    "{M} and that's ok. The thing is: {c}",
)

# Label-free parts, shared by both files.
CONTEXT = (
    "I've been a customer for about {years} years and never had a problem before.",
    "Not sure if this is the right place to ask.", "My daughter set this up for me, so please bear with me.",
    "I already looked through the help pages.", "I'm writing on behalf of my mother.",
    "Sorry for the long message.", "I spoke to someone on chat yesterday but the conversation dropped.",
    "This is my second email about this.", "I hope someone can help me today.",
    "Quick one, hopefully.", "I'm at work so I'll keep this brief.", "Long story short.",
)
OPENINGS = {
    "formal": ("Dear Support,", "Dear Sir or Madam,", "Hello,", "Good morning,", "Good afternoon,",
               "To whom it may concern,", "Dear customer service team,"),
    "neutral": ("Hi,", "Hello,", "Hi there,", "Hello team,", "Hi support,"),
    "casual": ("hey", "hey,", "Hi", "yo", "hiya", "hello?", "Hey there,"),
}
CLOSINGS = {
    "formal": ("Kind regards, {name} {initial}.", "Yours faithfully, {name} {initial}.", "Best regards, {name}",
               "Thank you for your assistance.", "I look forward to your reply.", "Many thanks, {name}"),
    "neutral": ("Thanks", "Thanks!", "Thank you.", "Thanks in advance.", "Regards, {name}", "Cheers, {name}",
                "Thanks, {name}", "Sent from my iPhone"),
    "casual": ("thx", "ta", "cheers", "thanks!!", "- {name}", "ty"),
}
FORMAL = {"I'm": "I am", "can't": "cannot", "don't": "do not", "won't": "will not", "it's": "it is",
          "It's": "It is", "didn't": "did not", "doesn't": "does not", "hasn't": "has not", "haven't": "have not",
          "isn't": "is not", "wasn't": "was not", "I'd": "I would", "I've": "I have", "there's": "there is",
          "There's": "There is", "what's": "what is", "that's": "that is", "you're": "you are"}

NAMES = ("Dana", "Tom", "Priya", "Marco", "Aisha", "Ken", "Lucia", "Sam", "Olu", "Greta", "Jin",
         "Fatima", "Pete", "Rosa", "Viktor", "Mei", "Carlos", "Hannah", "Raj", "Nora", "Bill", "Ines")
PLANS = ("Basic", "Plus", "Pro", "Family", "Premium", "Team", "Starter", "Business")
DEVICES = ("iPhone 13", "iPhone 15", "Pixel 7", "Galaxy S22", "iPad", "MacBook", "Windows laptop",
           "Chromebook", "Galaxy Tab", "OnePlus 11", "Android tablet")
BROWSERS = ("Chrome", "Firefox", "Safari", "Edge", "Brave")
CARRIERS = ("UPS", "FedEx", "USPS", "DHL", "the courier", "Royal Mail", "DPD")
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

MISSPELLINGS = {"receive": "recieve", "definitely": "definately", "address": "adress", "the": "teh",
                "because": "becuase", "account": "acount", "payment": "paymnet", "cancelled": "canceled",
                "separate": "seperate", "subscription": "subscribtion", "really": "realy", "please": "pls",
                "order": "oder", "what": "waht", "password": "pasword", "delivery": "delivary", "charged": "charge",
                "invoice": "invoce", "received": "recieved", "tomorrow": "tommorow", "anymore": "any more",
                "website": "web site", "until": "untill", "which": "wich", "weird": "wierd", "know": "kno"}
KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


@dataclass(frozen=True)
class Ticket:
    """One generated ticket and how it was made.

    ``template`` is the id of its intent (a core or short template); ``parts`` the ids of every label-specific
    fragment in it; ``clean`` the text before typos; ``secondary`` the label it mentions in passing, if any.
    """

    text: str
    label: str
    template: str
    parts: tuple[str, ...]
    shape: str  # "short" | "plain" | "long"
    secondary: str | None
    typo: bool
    clean: str


# Template ids read "<label>/<kind><index>", e.g. "billing/c07" is CORES["billing"][7].
_KINDS = {"c": CORES, "s": SHORTS, "d": DETAILS, "m": MENTIONS}


@dataclass(frozen=True)
class _Pools:
    """Template ids usable by one file, per label."""

    ids: dict[str, frozenset[str]]

    def pick(self, rng: random.Random, kind: str, label: str, where: Callable[[str], bool] | None = None) -> str:
        choices = [i for i in sorted(self.ids[label]) if _kind(i) == kind and (where is None or where(i))]
        return rng.choice(choices)


def _kind(tid: str) -> str:
    return tid.split("/")[1][0]


def _all_ids(label: str) -> list[str]:
    return [f"{label}/{kind}{i:02d}" for kind, table in _KINDS.items() for i in range(len(table[label]))]


def _fragment(tid: str) -> str:
    label, rest = tid.split("/")
    return _KINDS[rest[0]][label][int(rest[1:])]


def split_pools(seed: int) -> tuple[_Pools, _Pools]:
    """(training pools, held-out pools): each label's ids of each kind split by a seeded shuffle, disjoint."""
    rng = random.Random(f"split:{seed}")
    train, held = {}, {}
    for label in LABELS:
        train[label], held[label] = set(), set()
        for kind in _KINDS:
            ids = [i for i in _all_ids(label) if _kind(i) == kind]
            rng.shuffle(ids)
            k = max(1, round(len(ids) * HELD_OUT_SHARE))
            if kind == "c":  # keep some hand-written two-topic cores on both sides
                mixed = [i for i in ids if ">" in _fragment(i)]
                plain = [i for i in ids if ">" not in _fragment(i)]
                km = max(1, round(len(mixed) * HELD_OUT_SHARE))
                held[label] |= set(mixed[:km]) | set(plain[: k - km])
                train[label] |= set(mixed[km:]) | set(plain[k - km:])
            else:
                held[label] |= set(ids[:k])
                train[label] |= set(ids[k:])
    return _Pools({k: frozenset(v) for k, v in train.items()}), _Pools({k: frozenset(v) for k, v in held.items()})


def _full_pools() -> _Pools:
    return _Pools({label: frozenset(_all_ids(label)) for label in LABELS})


# --- rendering -------------------------------------------------------------------------------------------------


def _ordinal(d: int) -> str:
    suffix = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def _amount(rng: random.Random, currency: str) -> str:
    value = rng.choice((rng.uniform(3, 60), rng.uniform(60, 400), float(rng.choice((9, 12, 15, 29, 49, 99)))))
    text = f"{value:.0f}" if value.is_integer() and rng.random() < 0.5 else f"{value:.2f}"
    return currency + text


def _day(rng: random.Random) -> str:
    return rng.choice((f"{rng.choice(MONTHS)} {rng.randint(1, 28)}", f"the {_ordinal(rng.randint(1, 28))}",
                       rng.choice(WEEKDAYS), f"{rng.randint(1, 12)}/{rng.randint(1, 28)}"))


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
        "date": _day(rng),
        "when": _day(rng),
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
        # label words said several ways, so a paraphrase in one file finds its words in the other
        "parcel": rng.choice(("parcel", "package", "order", "delivery")),
        "app": rng.choice(("app", "app", "website", "site")),
        "acct": rng.choice(("account", "account", "profile")),
        "sub": rng.choice(("subscription", "membership", "plan")),
        "cancel": rng.choice(("cancel", "cancel", "end", "stop")),
        "charged": rng.choice(("charged", "billed")),
        "username": rng.choice((f"{name.lower()}_{rng.randint(10, 999)}", f"the_real_{name.lower()}",
                                f"{name}{rng.choice(('Runs', 'Cooks', 'Reads', 'Plays'))}")),
    }


_ALT = re.compile(r"\[([^\[\]]+)\]")
_SENTENCE_END = re.compile(r"[.!?]+(?:\)|'|\s|$)")


def _render(rng: random.Random, template: str, slots: dict[str, str]) -> str:
    return _ALT.sub(lambda m: rng.choice(m.group(1).split("|")), template).format(**slots)


def _upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def _lower_first(s: str) -> str:
    """Lower-case the first letter unless it starts a name-like word ('I', 'I'm', an all-caps token, a slot)."""
    first = s.split(" ", 1)[0]
    if first in ("I", "I'm", "I'd", "I've") or first[:2].isupper() or not first[:1].isalpha():
        return s
    return s[:1].lower() + s[1:]


def sentence_count(text: str) -> int:
    """Sentences in ``text``, counted by terminal punctuation (at least 1)."""
    return max(1, len(_SENTENCE_END.findall(text)))


def _formal(text: str) -> str:
    text = re.sub(r"\b([Ii])t's been\b", r"\1t has been", text)
    return re.sub(r"\b[A-Za-z]+'[a-z]+\b", lambda m: FORMAL.get(m.group(0), m.group(0)), text)


def _short(rng: random.Random, tid: str, slots: dict[str, str]) -> str:
    text = _render(rng, _fragment(tid), slots)
    text = rng.choice((text, text, text.capitalize()))
    text += rng.choice(("", "", "?", "??", "!", ".", " pls", " asap", "?!", " thx"))
    return rng.choice(("", "", "", "hi ", "Hi, ", "hello ")) + text


def _two_topic(rng: random.Random, core: str, mention: str) -> str:
    frame = rng.choice(FRAMES)
    c = _lower_first(core) if frame.index("{c}") > 0 and frame[frame.index("{c}") - 2] == "," else core
    return frame.format(m=mention, M=_upper_first(mention), c=c)


def _typo(rng: random.Random, text: str) -> str:
    """Realistic slips: a misspelt or mistyped word, dropped apostrophes, lower case, a missing full stop.

    Always returns a text different from ``text`` (the last resort doubles a letter)."""
    out = text
    for _ in range(rng.choice((1, 2, 2, 3))):
        op = rng.choice(("word", "word", "word", "apostrophes", "lower", "punct"))
        if op == "apostrophes":
            out = re.sub(r"(\w)'(\w)", r"\1\2", out)
        elif op == "lower":
            out = out.lower()
        elif op == "punct":
            out = out.rstrip(".!") if out.endswith((".", "!")) else out.replace(", ", " ", 1)
        else:
            out = _mistype(rng, out)
    if out == text:
        i = rng.choice([i for i, ch in enumerate(text) if ch.isalpha()])
        out = text[:i] + text[i] + text[i:]
    return out


def _mistype(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    idx = [i for i, w in enumerate(words) if w.isalpha() and (len(w) >= 4 or w.lower() in MISSPELLINGS)]
    if not idx:
        return text
    i = rng.choice(idx)
    w = words[i]
    if w.lower() in MISSPELLINGS and rng.random() < 0.6:
        words[i] = MISSPELLINGS[w.lower()]
        return " ".join(words)
    j = rng.randrange(1, len(w) - 1)
    op = rng.choice(("swap", "drop", "double", "neighbour"))
    if op == "swap":
        words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    elif op == "drop":
        words[i] = w[:j] + w[j + 1:]
    elif op == "double":
        words[i] = w[:j] + w[j] + w[j:]
    else:  # a neighbouring key on the same keyboard row
        row = next((r for r in KEYBOARD if w[j].lower() in r), "")
        k = row.find(w[j].lower())
        if k >= 0:
            words[i] = w[:j] + row[k - 1 if k == len(row) - 1 or (k > 0 and rng.random() < 0.5) else k + 1] + w[j + 1:]
    return " ".join(words)


def _ticket(rng: random.Random, pools: _Pools, label: str, shape: str, two_topic: bool, typo: bool) -> Ticket:
    slots = _fillers(rng)
    if shape == "short":
        tid = pools.pick(rng, "s", label)
        clean = _short(rng, tid, slots)
        return Ticket(_typo(rng, clean) if typo else clean, label, tid, (tid,), shape, None, typo, clean)

    # the intent: a hand-written two-topic core only when the quota asks for a second topic
    tid = pools.pick(rng, "c", label, where=lambda i: two_topic or ">" not in _fragment(i))
    raw = _fragment(tid)
    secondary = raw.split(">", 1)[0] if ">" in raw else None
    template = raw.split(">", 1)[-1]
    question = template.startswith("~")  # a plain question gets no complaint-style detail
    core = _render(rng, template.lstrip("~"), slots)
    parts = [tid]
    if two_topic and secondary is None:
        secondary = rng.choice([x for x in LABELS if x != label])
        mid = pools.pick(rng, "m", secondary)
        parts.append(mid)
        core = _two_topic(rng, core if core[-1] in ".?!" else core + ".", _render(rng, _fragment(mid), slots))

    register = rng.choices(("formal", "neutral", "casual"), weights=(25, 45, 30))[0]
    body = [core]
    if shape == "long":
        # 3-5 sentences: neutral context, the ask, one or two on-topic details
        contexts = rng.sample(CONTEXT, 2 if question else 1)  # a plain question gets context, not a complaint
        body[:0] = [_render(rng, c, slots) for c in contexts]
        for did in [] if question else rng.sample(sorted(i for i in pools.ids[label] if _kind(i) == "d"), rng.choice((1, 2))):
            body.append(_render(rng, _fragment(did), slots))
            parts.append(did)
        opening = rng.choice(OPENINGS[register])
        closing = rng.choice(CLOSINGS[register])
    else:  # a second topic comes with a detail on the main one, as people dwell on what they write about
        if not question and (secondary is not None or rng.random() < 0.3):
            did = pools.pick(rng, "d", label)
            body.append(_render(rng, _fragment(did), slots))
            parts.append(did)
        opening = rng.choice(OPENINGS[register]) if rng.random() < 0.4 else ""
        closing = rng.choice(CLOSINGS[register]) if rng.random() < 0.3 else ""

    main = " ".join(s if s[-1] in ".?!)" else s + "." for s in body)
    if register == "formal":
        main = _formal(main)
    elif register == "casual" and rng.random() < 0.5:
        main = _lower_first(main)
    if opening.endswith(",") and rng.random() < 0.7:
        main = _lower_first(main)  # "Hi, could you ..." rather than "Hi, Could you ..."
    clean = " ".join(p for p in (opening, main, closing.format(**slots)) if p)
    text = _typo(rng, clean) if typo else clean
    return Ticket(text, label, tid, tuple(parts), shape, secondary, typo, clean)


def _quota(n: int, share: float, rng: random.Random) -> list[bool]:
    flags = [i < round(n * share) for i in range(n)]
    rng.shuffle(flags)
    return flags


def make_tickets(
    n: int, seed: int, pools: _Pools | None = None, avoid: set[str] | None = None, stream: str = "tickets"
) -> list[Ticket]:
    """``n`` distinct tickets balanced over LABELS (shuffled, deterministic per seed and stream) from ``pools``
    (default: every template).

    Per label, exactly round(share * count) tickets are short or long, mention a second topic (of the
    non-short ones) and carry typos, as SHARES promises. Texts in ``avoid`` are not produced.
    """
    if n < 0:
        raise ProtegeError(f"cannot make {n} tickets; ask for 0 or more")
    pools = pools or _full_pools()
    rng = random.Random(f"{stream}:{seed}")
    seen = set(avoid or ())
    out: list[Ticket] = []
    base, extra = divmod(n, len(LABELS))
    for li, label in enumerate(LABELS):
        count = base + (li < extra)
        n_short, n_long = round(count * SHARES["short"]), round(count * SHARES["long"])
        shapes = ["short"] * n_short + ["long"] * n_long + ["plain"] * (count - n_short - n_long)
        rng.shuffle(shapes)
        two = iter(_quota(count - n_short, SHARES["two_topic"], rng))
        for shape, typo in zip(shapes, _quota(count, SHARES["typo"], rng)):
            two_topic = shape != "short" and next(two)
            for _ in range(200):
                t = _ticket(rng, pools, label, shape, two_topic, typo)
                if t.text not in seen:
                    break
            else:
                raise ProtegeError(f"could not write {count} distinct {label!r} tickets from these templates; "
                                   "ask for fewer rows")
            seen.add(t.text)
            out.append(t)
    rng.shuffle(out)
    return out


def _rows(tickets: list[Ticket], prefix: str) -> list[dict]:
    width = max(4, len(str(len(tickets))))
    return [{"id": f"{prefix}{i:0{width}d}", "text": t.text, "label": t.label} for i, t in enumerate(tickets, 1)]


def make_examples(n: int = 500, seed: int = 0) -> list[dict]:
    """``n`` labelled tickets {"id", "text", "label"} from every template, balanced over LABELS, distinct texts,
    deterministic per seed."""
    return _rows(make_tickets(n, seed), "t")


def demo_tickets(n_train: int, n_eval: int, seed: int) -> tuple[list[Ticket], list[Ticket]]:
    """(training, held-out) tickets from disjoint template pools; no text appears in both."""
    train_pools, held_pools = split_pools(seed)
    for name, n in (("n_train", n_train), ("n_eval", n_eval)):
        if n < len(LABELS):
            raise ProtegeError(f"{name}={n} cannot cover the {len(LABELS)} labels; ask for at least {len(LABELS)}")
    train = make_tickets(n_train, seed, train_pools)
    held = make_tickets(n_eval, seed, held_pools, avoid={t.text for t in train}, stream="held-out")
    return train, held


def write_demo_data(train_path: Path, eval_path: Path, n_train: int = 500, n_eval: int = 120, seed: int = 0) -> None:
    """Write the demo's training and held-out tickets as UTF-8 JSONL rows {"id", "text", "label"}.

    The held-out tickets come from template ids the training tickets never use (split_pools), ids are "t..." and
    "h..." so they never clash. Each file is written atomically (temporary file, then rename); missing parent
    folders are created.
    """
    train, held = demo_tickets(n_train, n_eval, seed)
    _write_jsonl(Path(train_path), _rows(train, "t"))
    _write_jsonl(Path(eval_path), _rows(held, "h"))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
