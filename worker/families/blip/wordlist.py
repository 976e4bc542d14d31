"""Common English words for the vocabulary of the locally built random BLIP models (no network, no dictionary)."""

from __future__ import annotations

# Lower-case, whitespace separated, grouped loosely by topic. The tokenizer also gets every single
# character and its "##" continuation, so any text tokenizes; these words only make the token ids
# look like a real BERT vocabulary (questions and captions are mostly whole words, not characters).
_WORDS = """
a an the this that these those there here it its is are was were be been being am do does did done
have has had having will would shall should can could may might must not no yes yeah ok okay
i me my mine we us our ours you your yours he him his she her hers they them their theirs one ones
who whom whose what which where when why how whether if then than so because as of in on at by for
with without within into onto out over under above below up down off about around through across
along among between behind beside besides beyond near far inside outside toward towards against
during before after since until till while from to via per upon both either neither each every all
any some many much more most few fewer less least several other another such same own only just
also too very quite rather really almost already always never ever often sometimes usually again
still yet even once twice now soon later today tonight tomorrow yesterday ago away back forward
together apart else maybe perhaps please thank thanks hello hi goodbye bye sorry well
zero two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand
million billion first second third fourth fifth sixth seventh eighth ninth tenth last next half
double single pair couple dozen number numbers count amount total
time times day days night nights morning afternoon evening noon midnight week weeks month months
year years hour hours minute minutes moment season spring summer autumn fall winter weekend
monday tuesday wednesday thursday friday saturday sunday january february march april june july
august september october november december holiday birthday christmas
man men woman women person people child children kid kids boy boys girl girls baby babies adult
adults teen teenager guy lady ladies gentleman family mother father mom dad parent parents son
daughter brother sister husband wife friend friends player players team crowd group couple
student teacher doctor nurse police officer soldier chef cook driver pilot farmer worker worker
artist singer dancer actor model bride groom king queen prince princess
head face hair eye eyes ear ears nose mouth lip lips tooth teeth tongue neck shoulder shoulders arm
arms hand hands finger fingers thumb nail chest breast breasts back belly stomach waist hip hips
leg legs knee knees foot feet toe toes skin body bodies blood bone bones heart brain beard mustache
naked nude nudity topless shirtless underwear bikini swimsuit lingerie bra panties sexual sex sexy
explicit adult porn pornography genitals penis vagina butt buttocks kiss kissing hug hugging
gun guns pistol pistols rifle rifles shotgun firearm firearms weapon weapons knife knives blade
sword swords dagger axe bullet bullets ammunition bomb bombs explosive explosives grenade missile
tank army military war fight fighting violence violent attack attacking shoot shooting shot kill
killing killed dead death corpse body injury injured wound wounds wounded hurt pain bleeding bloody
gore gory crime criminal prison jail arrest threat danger dangerous weaponry armed
drug drugs pill pills syringe needle cocaine heroin marijuana cannabis weed smoke smoking cigarette
cigarettes cigar tobacco vape alcohol beer wine whiskey vodka liquor drunk drinking bottle bottles
hate racist symbol symbols flag flags sign signs logo logos text word words letter letters writing
written handwriting message graffiti tattoo tattoos
cat cats dog dogs puppy puppies kitten kittens animal animals pet pets bird birds fish horse horses
cow cows pig pigs sheep goat goats chicken chickens duck ducks rabbit mouse mice rat bear bears
lion tiger elephant elephants giraffe giraffes zebra zebras monkey snake snakes deer wolf fox
whale dolphin shark insect bug spider bee butterfly frog turtle owl eagle parrot pigeon
photo photos photograph picture pictures image images shot snapshot selfie portrait screenshot
drawing painting cartoon illustration sketch video camera cameras frame scene view close closeup
background foreground front side top bottom left right middle center corner edge
house houses home building buildings room rooms kitchen bathroom bedroom living office school
church hospital hotel restaurant cafe bar shop store market mall street streets road roads city
town village park garden yard field farm forest tree trees wood woods grass flower flowers plant
plants leaf leaves sky cloud clouds sun moon star stars rain snow ice water sea ocean lake river
beach sand mountain mountains hill hills rock rocks stone island desert fire light lights dark
darkness shadow air wind storm weather
car cars truck trucks bus buses train trains bike bicycle bicycles motorcycle motorcycles boat boats
ship ships plane planes airplane airport station traffic vehicle vehicles wheel wheels tire tires
door doors window windows wall walls floor floors roof ceiling stairs fence gate bridge tower
table tables chair chairs sofa couch bed beds desk shelf shelves cabinet drawer lamp mirror clock
rug carpet curtain pillow blanket towel sink toilet bathtub shower oven stove microwave fridge
refrigerator
food meal meals breakfast lunch dinner snack pizza burger burgers sandwich sandwiches bread cake
cakes cookie cookies pie soup salad rice pasta noodles meat beef pork steak egg eggs cheese
butter milk coffee tea juice soda fruit fruits apple apples banana bananas orange oranges grape
grapes lemon strawberry strawberries vegetable vegetables tomato tomatoes potato potatoes carrot
carrots onion broccoli corn donut donuts chocolate candy sugar salt plate plates bowl bowls cup
cups mug glass glasses spoon fork fork knife dish dishes
shirt shirts t tshirt jacket jackets coat coats dress dresses skirt pants jeans shorts sweater hoodie
suit tie hat hats cap caps helmet shoe shoes boot boots sneaker sneakers sock socks glove gloves
scarf belt bag bags backpack purse wallet watch watches ring rings necklace bracelet earring
earrings jewelry sunglasses uniform costume mask clothes clothing outfit fabric cotton leather
silk wool denim pocket button zipper collar sleeve sleeves
phone phones smartphone laptop laptops computer computers tablet keyboard screen screens monitor
television tv remote cable charger battery speaker speakers headphones earbuds printer
book books paper papers pen pencil card cards box boxes package packaging label labels price tag
tags toy toys doll ball balls game games kite umbrella key keys tool tools hammer scissors
brush comb toothbrush soap bottle can jar basket bucket candle vase frame camera lens
item items product products brand brands new used vintage original fake genuine authentic sale
sell selling buy buying listing seller buyer ship shipping condition quality size sizes color
colors colour colours pattern material style model version set kit piece pieces part parts
red orange yellow green blue purple violet pink brown black white gray grey silver gold golden
beige navy teal turquoise maroon cream ivory tan khaki olive dark light bright pale colorful
striped plaid floral dotted plain solid transparent clear shiny matte
big small large little tiny huge giant long short tall high low wide narrow thick thin heavy
round square flat full empty open closed old young new fresh clean dirty wet dry hot cold warm cool
soft hard smooth rough sharp good bad great nice beautiful pretty cute ugly happy sad angry funny
strange real true false right wrong best better worst worse easy difficult simple busy quiet
loud fast slow early late free safe alone different similar important possible main whole
sit sits sitting sat stand stands standing stood walk walks walking walked run runs running ran
jump jumping fly flying swim swimming ride riding drive driving eat eats eating ate drink drinks
play plays playing played hold holds holding held carry carrying wear wears wearing wore look
looks looking looked see sees seeing saw seen watch watching show shows showing shown make makes
making made take takes taking took taken give gives giving gave given get gets getting got go goes
going went gone come comes coming came use uses using work works working lie lying lay sleep
sleeping sleeps wait waiting talk talking speak say says said tell told think know knew want need
like likes love loves feel try put set keep let help turn start stop move live find call ask
read reading write writes cut cutting cook cooking open opening close closing pull push throw
catch hit kick pose posing smile smiling laugh laughing cry crying dance dancing sing singing
contain contains containing include includes depict depicts depicting appear appears show
able about accept accident account act action active activity add address admit advice afford afraid
age agency agent agree agreement ahead aim allow amazing angle animal announce answer anxious anyone
anything anywhere apartment apparent appeal approach approve area argue argument arrive article aside
asleep assume attempt attend attention audience author available average avoid award aware awful
baker balance band bank base basic basis battle beat beauty become becomes beer begin beginning
behave belief believe belong bench benefit bit bite blank blind block board bomb bond border boss
bother bottom bound brain branch brave break breath breathe brick brief bring broad broken brush
budget build burn burst business butter cable calm campaign cancer capital captain care career
careful case cash castle cause cell central century certain chain challenge champion chance change
channel chapter character charge charity chart cheap check cheek chief choice choose circle citizen
claim class classic climb club coach coast code collect college column combine comfort comment
common community company compare competition complete computer concept concern concert conference
confidence confirm connect consider construct contact content contest context continue contract
control conversation copy correct cost cottage council country county course court cousin cover
crack craft crash crazy cream create credit crew crisis cross crown cultural culture curious current
customer cycle damage dance data date deal debate decade decide decision deep defeat defend define
degree deliver demand deny depend describe description design desire destroy detail develop device
die diet difference direction director discover discuss disease display distance divide document
dollar domestic dream dress drop dust duty earth east edge edition education effect effort election
element else emergency emotion employ empty end enemy energy engine engineer enjoy enough enter
entire entrance environment equal equipment escape estate event evidence exact example exercise
exhibition exist exit expect expensive experience expert explain express extra extreme fabric
factory fail failure fair faith familiar famous fan fashion fat fault fear feature fee female fiction
figure file fill film final finance fine finish fit fix flight float focus fold follow force foreign
form formal fortune forward frame freedom frequent friendly fuel fun function fund funny furniture
future gain gallery gap garage gas general generation gentle gift glad global goal god goods govern
government grab grade grand grant grave ground grow growth guard guess guest guide guitar habit
handle hang harbor hardly harm hat health hear heat height hell hero hide history hold hole honest
honor hope horror host hot human hunt hurry idea identity ignore ill image imagine impact impress
improve incident income increase indeed index industry influence inform information initial inner
instance instead interest internal internet interview introduce invest invite issue jacket job join
joke journey judge jump justice kid kind kitchen knock knowledge lack land language laptop large
laugh law lawyer layer lead leader league learn leave legal length lesson level library license
lift limit line link list listen load loan local lock lose loss lot lucky machine magazine mail major
male manage manager manner map mark master match matter meaning measure media medical medium meet
meeting member memory mental mention menu mess metal method mind minor miss mission mistake mix
mobile modern money mood motor movie murder muscle museum music mystery nation national native
nature neighbor nerve network news newspaper noise normal north note notice novel object obvious
occasion offer official oil operation opinion option order ordinary organize outcome owner page
paint palace panel parking party pass passenger past path patient pay peace pen period permit
personal phase physical piano pick piece pile pipe pitch place plan plastic platform pleasure plenty
pocket poem poet point pole policy political pool poor popular position post pot pound power
practice prepare present president press pressure prevent pride print private prize problem process
produce professor profit program project promise proof property protect proud prove provide public
purpose quarter question race radio range rate reach react ready reason receive recent record
reduce region relation release remain remember repair repeat report represent request rescue
research resource respect response rest result return reveal rich ring rise risk role rope rule
rush salt sample save scale scheme science score screen search seat secret section security seed
seek sell send sense serious serve service session shake shape share sharp shelter shift shine
shock shop shoulder sight signal silence silly sink sister site skill sleep slide slip smell snow
social society soft soil solution song sort sound source south space speech speed spend spirit
spot spread square staff stage stamp standard state statement status stay steal steel step stick
stock storm story strategy stream strength stress strike string strong structure stuff style
subject success sugar suggest summer supply support surface surprise survey suspect swing system
tail target task taste tax teach tear technology temperature tend term test theory thing thought
throat ticket tight title topic touch tour track trade tradition trail training transport travel
treat trial trick trip trouble trust truth twin type uncle union unit university upper upset urban
usual value variety various victim victory village visit visual voice volume vote wage wake war
warn wash waste wave wealth weapon web wedding weight west wheel wild will win wing winner wire wise
wish witness wonder wooden worry wrap yard youth zone
""".split()  # noqa: SIM905 (a word list reads better as text)

_EXTRA_PIECES = ("s", "es", "ed", "ing", "er", "ers", "est", "ly", "y", "ness", "ment", "tion", "ful", "less")

COMMON_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORDS))
"""The words, deduplicated, in a fixed order (the vocabulary ids depend on it)."""

SUFFIX_PIECES: tuple[str, ...] = tuple(f"##{piece}" for piece in _EXTRA_PIECES)
"""Common word endings as WordPiece continuations, so "guns" is ["gun", "##s"] like in BERT."""
